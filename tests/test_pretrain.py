"""pretrain.py: a backbone learned from unlabelled images (autoencoder, SimCLR), its checkpoint a
`backbone.weights=` file for train.py, and the bad inputs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, compose_config, run_tool, validate
from transferlab.config import parse_pretrain_config
from transferlab.config.schema import AutoencoderConfig
from transferlab.errors import ConfigError
from transferlab.models.pretrain import ConvDecoder, Pretrainer, corrupt, tokens_to_map
from transferlab.pretraining import check_pretrain_inputs
from transferlab.training import adapt_batch_norm

PREPROCESSING = {"crop_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.25] * 3}
CNN_FAMILIES = {  # source, name: one small member of each CNN family
    "resnet": ("torchvision", "resnet18"),
    "mobilenet": ("torchvision", "mobilenet_v3_small"),
    "efficientnet": ("timm", "test_efficientnet"),
    "convnext": ("timm", "test_convnext"),
}
# what every pretrain run here shares: tiny images and batches, a few steps (FAST without its data keys)
TINY = [
    *[o for o in FAST if not o.startswith(("trainer.limit_test", "backbone.weights"))],
    "data.min_batches_per_epoch=0",
    "data.batch_size=8",
    "data.num_workers=0",
]


def autoencoder(source: str, name: str, size: int = 32) -> Pretrainer:
    return Pretrainer(
        backbone={"source": source, "name": name, "weights": None},
        method={"name": "autoencoder"},  # a checkpoint's: the chosen method's keys, with its name
        optim={"_target_": "torch.optim.AdamW", "lr": 1e-3},
        scheduler={"name": "none"},
        preprocessing={**PREPROCESSING, "crop_size": size},
    )


@pytest.mark.parametrize("family", CNN_FAMILIES)
def test_the_decoder_gives_back_the_input_shape_for_each_cnn_family(family):
    model = autoencoder(*CNN_FAMILIES[family]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.reconstruct(images).shape == images.shape


def test_a_stride_that_does_not_divide_the_size_is_resized_exactly():
    decoder = ConvDecoder(channels=64, map_size=2, size=48, min_channels=8)  # 2 -> 64, then to 48
    assert decoder(torch.randn(1, 64, 2, 2)).shape == (1, 3, 48, 48)
    tokens = torch.arange(12.0).view(1, 4, 3)  # 2 x 2 positions, 3 channels
    assert torch.equal(tokens_to_map(tokens)[0, :, 1, 0], tokens[0, 2])


def test_corruption_noise_and_masks():
    images = torch.ones(4, 3, 16, 16)
    assert torch.equal(corrupt(images, AutoencoderConfig()), images)
    noisy = corrupt(images, AutoencoderConfig(corruption="noise", noise_std=0.5))
    assert 0.4 < (noisy - images).std() < 0.6
    masked = corrupt(images, AutoencoderConfig(corruption="mask", mask_ratio=0.5, mask_patch=4))
    blanked = (masked == 0).float()
    assert 0.3 < blanked.mean() < 0.7
    patches = blanked[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # every 4x4 patch all kept or all blanked
    assert torch.all(patches.amin(dim=(-1, -2)) == patches.amax(dim=(-1, -2)))


def write_unlabeled(root: Path, count: int = 24) -> Path:
    """Images in nested folders, some in class-like folders, one at the top: all of them are read."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """An autoencoder pretraining run (denoising) on an unlabelled folder, with TensorBoard."""
    base = tmp_path_factory.mktemp("pretrain")
    root = write_unlabeled(base / "images")
    run_dir = base / "run"
    overrides = [
        *TINY,
        f"data.root={root}",
        "data.val_fraction=0.25",
        "autoencoder.corruption=noise",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_tool("pretrain", *overrides) == 0
    return run_dir


def test_pretraining_reads_every_image_below_the_root_and_logs_reconstructions(pretrained):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["val/loss"] > 0 and Path(metrics["best_ckpt"]).is_file()
    lines = (pretrained / "splits" / "train.txt").read_text().splitlines()
    lines += (pretrained / "splits" / "val.txt").read_text().splitlines()
    assert len(lines) == 24 and any(line.startswith("b/c/") for line in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((pretrained / "tensorboard").rglob("events.*")).parent))
    events.Reload()
    assert "pretrain/reconstructions" in events.Tags()["images"]


def test_a_pretrain_checkpoint_loads_as_backbone_weights_encoder_equal(pretrained, fast_cfg):
    best = json.loads((pretrained / "metrics.json").read_text())["best_ckpt"]
    saved = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    from transferlab.build import build_model
    from transferlab.data.transforms import Preprocessing

    config = validate(fast_cfg(f"backbone.weights={best}"))
    model = build_model(config, ["a", "b"], Preprocessing(crop_size=16, resize_size=18), None)
    model.load_pretrained_backbone()
    encoder = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
    assert encoder and all(torch.equal(model.backbone.state_dict()[k], v) for k, v in encoder.items())
    # freeze.bn=adapt (the default) updates a pretrained backbone's statistics without measuring them
    assert config.freeze.bn == "adapt" and model.frozen_stages.bn_mode != "train"
    adapt_batch_norm(model, datamodule=None)  # no images read
    assert model.frozen_stages.bn_mode == "train" and model.hparams.freeze["bn"] == "train"


def test_a_pretrain_checkpoint_of_another_architecture_is_refused_before_data(pretrained, fast_cfg):
    best = json.loads((pretrained / "metrics.json").read_text())["best_ckpt"]
    with pytest.raises(
        ConfigError, match="holds a torchvision resnet18, but backbone is torchvision resnet50"
    ):
        validate(fast_cfg("backbone=resnet50", f"backbone.weights={best}"))


def test_a_pretrain_checkpoint_where_a_classifier_is_expected_says_how_to_use_it(
    pretrained, tmp_path, capsys
):
    best = json.loads((pretrained / "metrics.json").read_text())["best_ckpt"]
    images = pretrained.parent / "images" / "a"
    assert (
        run_tool("predict", f"ckpt_path={best}", f"inputs={images}", f"hydra.run.dir={tmp_path / 'p'}") != 0
    )
    assert f"fine-tune it with train.py backbone.weights={best}" in "".join(capsys.readouterr())


def test_simclr_pretrains_through_lightly_and_resumes(tmp_path):
    root = write_unlabeled(tmp_path / "images", count=16)
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.root={root}", "method=simclr", "logger=none", f"hydra.run.dir={run_dir}"]
    assert run_tool("pretrain", *overrides) == 0
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("projection.") for k in state)
    assert run_tool("pretrain", f"resume={run_dir}", "trainer.max_epochs=2") == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_trained"] == 2


def pretrain_config(tmp_path: Path, *overrides: str):
    composed = compose_config([*TINY, f"data.root={tmp_path}", *overrides], tmp_path / "run", "pretrain")
    return parse_pretrain_config(composed)


def test_a_corruption_setting_typed_for_another_corruption_is_refused(tmp_path, capsys):
    overrides = [
        *TINY,
        f"data.root={tmp_path}",
        "autoencoder.noise_std=0.3",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    status = run_tool("pretrain", *overrides)
    message = "autoencoder.noise_std is read only with autoencoder.corruption=noise (corruption=none)"
    assert status == 2 and message in "".join(capsys.readouterr())
    overrides[-2:] = ["autoencoder={noise_std: 0.5}", f"hydra.run.dir={tmp_path / 'd'}"]  # dict form, default
    assert run_tool("pretrain", *overrides) == 2 and message in "".join(capsys.readouterr())
    # with its corruption the key is read: the run gets past the config (and stops at the empty folder)
    for typed in (
        ["autoencoder.corruption=noise", "autoencoder.noise_std=0.3"],
        ["autoencoder.corruption=mask", "autoencoder.mask_ratio=0.6"],
    ):
        overrides = [*TINY, f"data.root={tmp_path}", *typed, f"hydra.run.dir={tmp_path / typed[0][-4:]}"]
        assert run_tool("pretrain", *overrides) == 2
        assert "holds no image files" in "".join(capsys.readouterr())


def test_a_folder_without_images_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    status = run_tool("pretrain", *TINY, f"data.root={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert status != 0 and "holds no image files, in any sub-folder" in "".join(capsys.readouterr())


def test_a_backbone_without_a_spatial_map_is_refused_naming_cnn_choices(tmp_path):
    config = pretrain_config(tmp_path, "backbone=torchvision", "backbone.name=googlenet")
    with pytest.raises(ConfigError, match="no spatial feature map.*choose a CNN backbone"):
        check_pretrain_inputs(config)


def test_unlabeled_data_is_refused_by_train_and_the_method_keys_are_checked(fast_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data=unlabeled has no labels"):
        validate(fast_cfg("data=unlabeled", f"data.root={tmp_path}"))
    with pytest.raises(ConfigError, match="method=simclr contrasts the images of a batch"):
        pretrain_config(tmp_path, "method=simclr", "data.batch_size=1")
    with pytest.raises(
        ConfigError, match=r"simclr.\* is read only with method=simclr \(method=autoencoder\)"
    ):
        pretrain_config(tmp_path, "simclr.temperature=0.1")
    with pytest.raises(ConfigError, match="method='byol' is not valid; choose one of: autoencoder, simclr"):
        pretrain_config(tmp_path, "method=byol")


def test_the_wrong_checkpoint_or_run_to_continue_is_refused_before_any_file(
    pretrained, checkpoint, tmp_path, capsys
):
    """pretrain ckpt_path= of a classifier or of another method; resume= of the other tool's run: one
    line each, and the other run's directory is left as it was."""
    best = json.loads((pretrained / "metrics.json").read_text())["best_ckpt"]
    root = pretrained.parent / "images"
    base = [*TINY, f"data.root={root}", "trainer.max_epochs=2"]
    for index, (start, message) in enumerate(
        [
            (checkpoint, "is a classifier's checkpoint (train.py), not a pretraining one"),
            (
                best,
                "is a pretraining of method=autoencoder backbone=resnet18, and this run's are method=simclr",
            ),
        ]
    ):
        run = tmp_path / str(index)
        assert run_tool("pretrain", *base, "method=simclr", f"ckpt_path={start}", f"hydra.run.dir={run}") == 2
        assert message in "".join(capsys.readouterr())
    before = sorted(p.relative_to(pretrained) for p in pretrained.rglob("*"))
    assert run_tool("train", f"resume={pretrained}", "trainer.max_epochs=3") != 0
    printed = "".join(capsys.readouterr())
    assert (
        f"resume={pretrained} is a pretrain run, which train cannot continue: transferlab pretrain resume="
        in printed
    )
    assert sorted(p.relative_to(pretrained) for p in pretrained.rglob("*")) == before


def test_a_crop_scale_that_is_not_a_pair_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"simclr.crop_scale=\[0.5\] must be \[low, high\]"):
        pretrain_config(tmp_path, "method=simclr", "simclr.crop_scale=[0.5]")


@pytest.mark.parametrize("setting", ["data.classes=[cat,dog]", "data.shots=2", "data.test_fraction=0.2"])
def test_a_class_setting_for_unlabelled_images_is_refused(tmp_path, setting):
    with pytest.raises(ConfigError, match=rf"{setting.split('=')[0]}=.* is not read by data=unlabeled"):
        pretrain_config(tmp_path, setting)
