"""Every config group option composes and validates; bad names list the valid choices."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config
from transferlab.config import validate_train_config
from transferlab.errors import ConfigError

NEEDS = {  # options that need a value the user must give
    ("backbone", "torchvision"): ["backbone.name=regnet_y_400mf"],
    ("backbone", "timm"): ["backbone.name=test_resnet"],
    ("data", "imagefolder"): ["data.root=/nonexistent"],
    ("experiment", "digits_finetune"): ["backbone.weights=null"],
}
NOT_FOR_TRAIN = {("data", "from_checkpoint")}


def group_options():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            if (group_dir.name, option.stem) not in NOT_FOR_TRAIN:
                yield group_dir.name, option.stem


@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    cfg = compose_config(overrides, tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group != "hydra":
        validate_train_config(cfg)


@pytest.mark.parametrize("group", [p.name for p in CONF_DIR.iterdir() if p.is_dir()])
def test_every_config_file_starts_with_a_one_line_description(group):
    for option in (CONF_DIR / group).glob("*.yaml"):
        first = option.read_text().splitlines()[0]
        if first.startswith("# @package"):
            first = option.read_text().splitlines()[1]
        assert first.startswith("# ") and len(first) > 10, option


@pytest.mark.parametrize("group", ["backbone", "optim", "data", "scheduler", "freeze"])
def test_unknown_group_option_lists_valid_choices(group, tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_config([f"{group}=does_not_exist"], tmp_path)
    message = str(err.value)
    assert "Available options" in message
    for option in (CONF_DIR / group).glob("*.yaml"):
        assert option.stem in message


def test_unknown_torchvision_model_name_lists_models(tmp_path):
    cfg = compose_config(["backbone=torchvision", "backbone.name=resnet_1000"], tmp_path)
    with pytest.raises(ConfigError, match="backbone.name='resnet_1000'.*Valid names:.*resnet50"):
        validate_train_config(cfg)


def test_unknown_weights_name_lists_weights(tmp_path):
    cfg = compose_config(["backbone=resnet50", "backbone.weights=IMAGENET1K_V9"], tmp_path)
    with pytest.raises(ConfigError, match="IMAGENET1K_V9.*IMAGENET1K_V1, IMAGENET1K_V2"):
        validate_train_config(cfg)


def test_missing_weights_file_names_the_path(tmp_path):
    cfg = compose_config([f"backbone.weights={tmp_path}/nope.pth"], tmp_path)
    with pytest.raises(ConfigError, match="nope.pth: no such file"):
        validate_train_config(cfg)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("freeze.name=sometimes", "freeze.name='sometimes'.*full, linear_probe, partial, gradual"),
        ("freeze.bn=maybe", "freeze.bn='maybe'.*auto, train, eval"),
        ("scheduler.name=linear", "scheduler.name='linear'.*none, cosine, onecycle, step, plateau"),
        ("freeze=gradual freeze.milestones=[5,2]", r"freeze.milestones=\[5, 2\] must be strictly increasing"),
        ("freeze=gradual freeze.milestones=[]", "freeze=gradual needs freeze.milestones"),
        ("freeze=gradual freeze.milestones=[0,3]", "freeze.milestones entry=0 must be an integer >= 1"),
        (
            "freeze=gradual freeze.milestones=[2,30]",
            r"epoch 30 is past the last epoch \(trainer.max_epochs=10",
        ),
        ("freeze=partial freeze.trainable_blocks=-1", "freeze.trainable_blocks=-1 must be an integer >= 0"),
        ("optim.layer_decay=1.5", r"optim.layer_decay=1.5 must be in \(0, 1\]"),
        ("optim.layer_decay=0", r"optim.layer_decay=0 must be in \(0, 1\]"),
        ("optim.backbone_lr_mult=-0.1", "optim.backbone_lr_mult=-0.1 must be a number >= 0"),
        ("tune.min_lr=1", "tune.min_lr=1 and tune.max_lr=1.0"),
        ("optim.lr=-1", "optim.lr=-1"),
        ("data.name=mnist", "data.name='mnist'.*digits, cifar10, imagefolder"),
        ("data.shots=0", "data.shots=0"),
        ("loss.label_smoothing=1.5", "loss.label_smoothing=1.5"),
        ("optim._target_=torch.optim.Nope", "optim._target_='torch.optim.Nope'"),
    ],
)
def test_bad_values_name_the_key(override, pattern, tmp_path):
    cfg = compose_config(["backbone.weights=null", "trainer.max_epochs=10", *override.split()], tmp_path)
    with pytest.raises(ConfigError, match=pattern):
        validate_train_config(cfg)
