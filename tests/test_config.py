"""Every config group option composes and validates; bad names list the valid choices."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config, validate
from transferlab.config import parse_group, parse_pretrain_config
from transferlab.config import schema as s
from transferlab.config.schema import (
    AUTOAUGMENT_POLICIES,
    INTERPOLATIONS,
    Cifar10Config,
    CosineScheduleConfig,
)
from transferlab.config.store import OPTIONS
from transferlab.errors import ConfigError

NEEDS = {  # options that need a value the user must give
    ("backbone", "torchvision"): ["backbone.name=regnet_y_400mf"],
    ("backbone", "timm"): ["backbone.name=test_resnet"],
    ("data", "imagefolder"): ["data.root=/nonexistent"],
    ("optim", "custom"): ["optim._target_=torch.optim.Adagrad", "optim.lr=0.01"],
    ("experiment", "digits_finetune"): ["backbone.weights=null"],
}


def group_options():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    if (group, option) == ("data", "unlabeled"):  # pretrain.py's
        for method in ("autoencoder", "simclr"):
            cfg = compose_config(
                [*overrides, f"data.root={tmp_path}", f"method={method}"], tmp_path, "pretrain"
            )
            assert parse_pretrain_config(cfg).method_config.name == method
        return
    cfg = compose_config(overrides, tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group != "hydra":
        validate(cfg)


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
        validate(cfg)


def test_unknown_weights_name_lists_weights(tmp_path):
    cfg = compose_config(["backbone=resnet50", "backbone.weights=IMAGENET1K_V9"], tmp_path)
    with pytest.raises(ConfigError, match="IMAGENET1K_V9.*IMAGENET1K_V1, IMAGENET1K_V2"):
        validate(cfg)


def test_missing_weights_file_names_the_path(tmp_path):
    cfg = compose_config([f"backbone.weights={tmp_path}/nope.pth"], tmp_path)
    with pytest.raises(ConfigError, match="nope.pth: no such file"):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("freeze.name=sometimes", "freeze.name='sometimes'.*full, linear_probe, partial, gradual"),
        ("freeze.bn=maybe", "freeze.bn='maybe'.*adapt, train, eval, auto"),
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
        ("optim.layer_decay=0", r"optim.layer_decay=0.0 must be in \(0, 1\]"),
        ("optim.backbone_lr_mult=-0.1", "optim.backbone_lr_mult=-0.1 must be 'auto' or a number >= 0"),
        ("tune.min_lr=1", "tune.min_lr=1.0 and tune.max_lr=1.0"),
        ("optim.lr=-1", "optim.lr=-1"),
        ("data.name=mnist", "data.name='mnist'.*digits, cifar10, imagefolder"),
        ("data.shots=0", "data.shots=0"),
        ("loss.label_smoothing=1.5", "loss.label_smoothing=1.5"),
        ("optim._target_=torch.optim.Nope", "optim._target_='torch.optim.Nope'"),
        ("optimized_mode=maximum", "optimized_mode='maximum' is not valid; choose one of: max, min"),
        ("model.compile=maybe", "model.compile"),
        ("data.batch_size=many", "data.batch_size"),
        ("data.interpolation=cubic", "data.interpolation='cubic'.*bilinear, bicubic"),
        ("+data.batchsize=8", "data.batchsize is not a key of data=digits; its keys are: name, root"),
        ("+optim.lrr=0.1", "optim.lrr is not a key of optim=sgd"),
        ("+seedd=1", "seedd is not a key of train.yaml"),
        ("+trainer.max_epoch=3", "trainer.max_epoch is not an argument of lightning.Trainer"),
        ("trainer.max_epochs=-2", r"trainer.max_epochs=-2 must be an integer >= 1"),
        ("data.classes=[]", r"data.classes=\[\] must list at least 2 classes"),
        ("optim=adam optim._target_=torch.optim.SGD", "optim.betas is not a key of optim=sgd"),
        ("scheduler=cosine scheduler.name=step", "scheduler.warmup_epochs is not a key of scheduler=step"),
        ("+backbone.wieghts=x", "backbone.wieghts is not a key of backbone;"),
        ("+optim.amsgrad=true", r"optim.amsgrad is not a key of optim=sgd.*\+optim.extra.amsgrad=\.\.\."),
        (
            "optim=adam +optim.extra.foo=1",
            "optim: foo is not an argument of torch.optim.Adam; its arguments:",
        ),
        ("data=cifar10 data.test_fraction=0.1", "data.test_fraction=0.1: CIFAR-10 has its own test split"),
        ("data=imagefolder data.root=null", "data.root must be set for data=imagefolder"),
        ("data.class_fraction=[1]", r"data.class_fraction=\[1\] must map classes to fractions in \(0, 1\]"),
        ("data.class_fraction={3:2}", "data.class_fraction=.*must map classes to fractions"),
    ],
)
def test_bad_values_name_the_key(override, pattern, tmp_path):
    assert re.search(pattern, config_error(["trainer.max_epochs=10", *override.split()], tmp_path))


def config_error(overrides: list[str], tmp_path) -> str:
    """The message that stops a run with these overrides: from Hydra's composition (a value of the wrong
    type) or from parsing the config (everything else); before any data is read either way."""
    try:
        validate(compose_config(["backbone.weights=null", *overrides], tmp_path))
    except ConfigCompositionException as err:
        return f"{err} {err.__cause__}"
    except ConfigError as err:
        return str(err)
    raise AssertionError(f"{overrides} were accepted")


def schema_defaults(schema: type) -> dict:
    defaults = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


@pytest.mark.parametrize("group", list(OPTIONS))
def test_presets_only_set_values_that_differ_from_the_schema(group):
    """Each default lives in the schema: a preset that restates one would be a second home for it."""
    for option in (CONF_DIR / group).glob("*.yaml"):
        values = yaml.safe_load(option.read_text())
        [schema_line] = [d for d in values.pop("defaults") if isinstance(d, dict)]
        assert schema_line == {f"/schema/{group}@_here_": next(iter(schema_line.values()))}, option
        schema = OPTIONS[group][next(iter(schema_line.values()))]
        defaults = schema_defaults(schema)
        for key, value in values.items():
            assert key in defaults, f"{option}: {key} is not in {schema.__name__}"
            assert value != defaults[key], f"{option}: {key}: {value} is the schema's default already"


def test_the_defaults_that_disagreed_are_the_documented_ones(tmp_path):
    # conf/scheduler/cosine.yaml said 0.01 and 1 warmup epoch; the code's fallbacks said 0.0 and 0
    cosine = parse_group("scheduler", {"name": "cosine"})
    assert (
        (cosine.min_lr_ratio, cosine.warmup_epochs)
        == (0.01, 1.0)
        == (
            CosineScheduleConfig.min_lr_ratio,
            CosineScheduleConfig.warmup_epochs,
        )
    )
    composed = compose_config(["scheduler=cosine"], tmp_path).scheduler
    assert (composed.min_lr_ratio, composed.warmup_epochs) == (0.01, 1.0)
    from transferlab.finetune.optim import schedule_factor

    factor = schedule_factor(cosine, total_steps=100, steps_per_epoch=10)
    assert factor(100) == pytest.approx(0.01) and factor(0) == pytest.approx(0.01) and factor(10) == 1.0
    # val_fraction: 0.2 of the whole set for digits and image folders, 0.1 of CIFAR-10's training set
    assert parse_group("data", {"name": "digits"}).val_fraction == 0.2
    assert parse_group("data", {"name": "imagefolder", "root": "/x"}).val_fraction == 0.2
    assert (
        parse_group("data", {"name": "cifar10", "root": "/x"}).val_fraction
        == 0.1
        == Cifar10Config.val_fraction
    )


def test_choices_in_the_schema_are_the_libraries_own():
    from torchvision.transforms import InterpolationMode, v2

    assert set(INTERPOLATIONS) == {mode.value for mode in InterpolationMode}
    assert tuple(policy.value for policy in v2.AutoAugmentPolicy) == AUTOAUGMENT_POLICIES


def test_every_option_of_a_group_has_the_groups_keys(tmp_path):
    """A plain mapping (a checkpoint's, a saved run's) finds its option's schema by its name."""
    for group, options in OPTIONS.items():
        for option, schema in options.items():
            required = {f.name: "x" for f in dataclasses.fields(schema) if f.default == "???"}
            required |= {"monitor": "val/loss"} if "monitor" in required else {}
            required |= {"_target_": "torch.optim.Adagrad", "lr": 0.01} if option == "custom" else {}
            made = schema(**required)
            assert type(parse_group(group, dataclasses.asdict(made))) is schema, (group, option)


def test_any_torch_optimizer_with_its_own_arguments(tmp_path):
    cfg = compose_config(["optim=adam", "+optim.extra.amsgrad=true"], tmp_path)
    assert validate(cfg).optim.optimizer_kwargs()["amsgrad"] is True
    other = [
        "optim=custom",
        "optim._target_=torch.optim.Adagrad",
        "optim.lr=0.001",
        "+optim.extra.lr_decay=0.01",
    ]
    config = validate(compose_config(other, tmp_path))
    assert config.optim.optimizer_kwargs() == {"lr": 1e-3, "weight_decay": 0.0, "lr_decay": 0.01}


def test_lightning_owns_the_trainer_defaults(tmp_path):
    """A key left out of trainer.* is Lightning's default, as the Trainer itself would take it."""
    from transferlab.config.parse import trainer_arg

    config = validate(compose_config(["~trainer.strategy", "~trainer.deterministic"], tmp_path))
    assert "strategy" not in config.trainer and trainer_arg(config.trainer, "strategy") == "auto"
    assert trainer_arg(config.trainer, "deterministic") is None
    with pytest.raises(ConfigError, match="trainer.max_epochs=None must be an integer >= 1"):
        validate(compose_config(["~trainer.max_epochs"], tmp_path))  # Lightning's: 1000, or max_steps


def test_interpolation_names_are_read_as_torchvision_reads_them():
    assert parse_group("data", {"name": "digits", "interpolation": "BICUBIC"}).interpolation == "bicubic"


def test_an_unknown_nested_key_is_named_with_its_path_and_its_sections_keys():
    from transferlab.config.parse import build
    from transferlab.config.schema import OptimizeConfig

    values = {"ckpt_path": "x.ckpt", "method": "prune", "data": {}, "paths": {}, "prune": {"amout": 0.5}}
    with pytest.raises(
        ConfigError, match=r"prune.amout is not a key of prune \(optimize.yaml\); its keys are: amount, "
    ):
        build(OptimizeConfig, values, "", "optimize.yaml")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: s.ExportConfig(ckpt_path="b.ckpt", format="torchscript", opset=17),
            "opset is read only with format=onnx",
        ),
        (lambda: s.RecoveryConfig(epochs=0, lr=0.1), "finetune.lr is read only with finetune.epochs > 0"),
        (
            lambda: s.PredictConfig(model_path="m.onnx", inputs="d", device="cpu"),
            "device is read only with ckpt_path",
        ),
        (
            lambda: s.PredictConfig(model_path="m.onnx", inputs="d", trust_checkpoint=True),
            "trust_checkpoint is read only with ckpt_path",
        ),
        (
            lambda: s.PredictConfig(model_path="m.pt", inputs="d", trust_checkpoint=True),
            "trust_checkpoint is read only with ckpt_path",
        ),
    ],
)
def test_keys_that_nothing_would_read_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
    s.PredictConfig(model_path="m.pt", inputs="d", device="cpu")  # TorchScript runs on `device`


def test_help_lists_the_groups_the_tool_composes(capsys):
    """`optimize --help` names its own groups (data, paths), not train's; train's lists them all, the
    defaults in brackets; a tool without groups has no groups section."""
    from tests.conftest import run_tool

    assert run_tool("optimize", "--help") == 0
    printed = capsys.readouterr().out
    groups = printed.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert {line.split(":")[0] for line in groups.splitlines() if ": " in line} == {"data", "paths"}
    assert "[from_checkpoint]" in groups and "method: quantize" in printed
    assert printed.startswith("A smaller, faster model: `transferlab optimize")  # the tool's docstring
    assert run_tool("train", "--help") == 0
    printed = capsys.readouterr().out
    assert (
        "backbone: " in printed and "[resnet18]" in printed and "trainer: cpu, ddp, [default], gpu" in printed
    )
    # not eval's from_checkpoint, nor pretrain's unlabeled
    assert "data: cifar10, [digits], imagefolder\n" in printed
    assert run_tool("eval", "--help") == 0
    assert "data: cifar10, digits, [from_checkpoint], imagefolder\n" in capsys.readouterr().out
    assert run_tool("eval", "hydra.job.name=mine", "--help") == 0  # the chosen option is always listed
    assert "data: cifar10, digits, [from_checkpoint], imagefolder\n" in capsys.readouterr().out
    assert run_tool("pretrain", "data=digits", "--help") == 0
    assert "data: cifar10, [digits], imagefolder, unlabeled\n" in capsys.readouterr().out
    assert run_tool("summary", "--help") == 0
    printed = capsys.readouterr().out
    assert "Configuration groups" not in printed and "sweep_dir: ???" in printed
