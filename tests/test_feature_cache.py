"""`model.cache_features`: a frozen backbone's features computed once per split give the metrics of a run
on images (the head sees the same inputs, batch for batch), with the LR finder and resume; the settings
where it is not valid are refused (true) or turned off with a reason (auto)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from tests.conftest import FAST, compose_config, data_config, run_tool
from transferlab.config import parse_group, parse_train_config
from transferlab.config.schema import NoAugmentConfig, TrainConfig
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.finetune.feature_cache import FeatureCache, stochastic_layers, use_feature_cache
from transferlab.models.classifier import ImageClassifier

# a linear probe that learns something in two short epochs; dropout in the head draws from the RNG
PROBE = [
    *FAST,
    "backbone.name=shufflenet_v2_x0_5",  # small checkpoints; batch norm, no dropout
    "freeze=linear_probe",
    "augment=none",
    "data.classes=[0,1,2]",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "head.dropout=0.2",
    "logger=csv",
]
LR_FIND = ["tune.lr_find=true", "tune.num_training=20", "tune.max_lr=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same run on images (false) and on cached features (auto), with the LR finder first."""
    root = tmp_path_factory.mktemp("feature_cache")
    for setting in ("false", "auto"):
        overrides = [*PROBE, *LR_FIND, f"model.cache_features={setting}", f"hydra.run.dir={root / setting}"]
        assert run_tool("train", *overrides) == 0
    return {"images": root / "false", "features": root / "auto"}


def scalars(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def logged_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_metrics(run: Path, reference: Path) -> None:
    got, expected = scalars(run), scalars(reference)
    assert got.keys() == expected.keys() and {"val/acc", "val/loss", "test/acc", "test/loss"} <= got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_cached_features_give_the_metrics_of_images_step_by_step(runs):
    logs = {run: (runs[run] / "train.log").read_text() for run in runs}
    assert "Backbone features are cached (model.cache_features=auto)" in logs["features"]
    # once, for the LR finder and the fit: the backbone's weights did not change in between
    assert logs["features"].count("Cached the backbone features of the train split") == 1
    assert "Cached the backbone features" not in logs["images"]
    assert_same_metrics(runs["features"], runs["images"])
    assert scalars(runs["images"])["val/acc"] > 0.4  # above chance (3 classes): it learned something
    # the LR finder's curve and suggestion, then every logged step (train losses, learning rates)
    found = [json.loads((runs[r] / "lr_find.json").read_text()) for r in ("features", "images")]
    assert found[0]["suggestion"] == pytest.approx(found[1]["suggestion"], rel=1e-6)
    assert found[0]["loss"] == pytest.approx(found[1]["loss"], abs=1e-6)
    rows = [logged_rows(runs[r]) for r in ("features", "images")]
    assert len(rows[0]) == len(rows[1]) > 10
    assert len({row["train/loss_step"] for row in rows[1] if row["train/loss_step"]}) > 10  # it changes
    for cached, uncached in zip(*rows, strict=True):
        assert cached.keys() == uncached.keys()
        for key, value in uncached.items():
            if value == "":
                assert cached[key] == "", key
            else:
                assert float(cached[key]) == pytest.approx(float(value), abs=1e-6), key


def test_the_same_checkpoint_is_chosen_and_it_is_an_ordinary_one(runs):
    """best.ckpt is of the same epoch with the same weights; eval.py's way (the whole network on images)
    reproduces the cached run's test metrics."""
    ckpts = {r: torch.load(runs[r] / "checkpoints" / "best.ckpt", weights_only=True) for r in runs}
    assert ckpts["features"]["epoch"] == ckpts["images"]["epoch"]
    assert ckpts["features"]["global_step"] == ckpts["images"]["global_step"]
    states = [ckpts[r]["state_dict"] for r in ("features", "images")]
    assert states[0].keys() == states[1].keys() and any(k.startswith("backbone.") for k in states[0])
    for name, tensor in states[1].items():
        torch.testing.assert_close(states[0][name], tensor, rtol=0, atol=1e-6, msg=name)

    model = ImageClassifier.load_from_checkpoint(
        runs["features"] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True
    ).eval()
    stored = ckpts["features"]["datamodule_hyper_parameters"]
    data = TransferDataModule(data_config(stored["data"]), Preprocessing.from_dict(stored["preprocessing"]))
    loss = correct = total = 0.0
    with torch.no_grad():
        for batch, (images, labels) in enumerate(data.test_dataloader()):
            if batch == 2:  # FAST: trainer.limit_test_batches=2
                break
            logits = model(images)
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += len(labels)
    trained = scalars(runs["features"])
    assert trained["test/acc"] == pytest.approx(correct / total, abs=1e-6)
    assert trained["test/loss"] == pytest.approx(loss / total, abs=1e-6)


def test_a_resumed_run_on_cached_features_continues_the_same_run(runs, tmp_path):
    """One epoch on features (at the LR the finder chose), resumed for the second: the run on images."""
    lr = json.loads((runs["images"] / "lr_find.json").read_text())["suggestion"]
    run_dir = tmp_path / "resumed"
    one_epoch = [*PROBE, "trainer.max_epochs=1", f"optim.lr={lr!r}", "model.cache_features=true"]
    assert run_tool("train", *one_epoch, f"hydra.run.dir={run_dir}") == 0
    assert run_tool("train", f"resume={run_dir}", "trainer.max_epochs=2") == 0
    assert_same_metrics(run_dir, runs["images"])


class Flatten(L.LightningModule):
    """A model whose backbone's features are its images, flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Flatten()

    def features(self, images: torch.Tensor) -> torch.Tensor:  # what the head takes (ImageClassifier's)
        return self.backbone(images)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_of_features_draws_the_order_of_the_loader_of_images(workers):
    """With loader workers (image folders have them by default) the shuffling seed is drawn when the
    iterator is made, which for the first epoch is before the epoch's reseed; the features' loader,
    in memory, keeps one worker so that its order is drawn at the same moment."""
    config = data_config({"name": "digits", "image_size": 8, "classes": [0, 1], "num_workers": workers})
    data = TransferDataModule(config, Preprocessing(crop_size=8, resize_size=8), augment=NoAugmentConfig())
    batches = []
    for cache in (None, FeatureCache(Flatten())):
        data.feature_cache = cache
        loader = data.train_dataloader()
        torch.manual_seed(0)  # the RNG as it is when Lightning makes the first epoch's iterator
        iterator = iter(loader)
        torch.manual_seed(1)  # ReseedEachEpoch, after that
        batches.append(list(iterator))
    (images, features) = batches
    assert len(images) == len(features) > 2
    for (image, label), (feature, same_label) in zip(images, features, strict=True):
        assert torch.equal(label, same_label) and torch.equal(image.flatten(1), feature)


def parse(tmp_path: Path, *overrides: str) -> TrainConfig:
    return parse_train_config(compose_config([*FAST, *overrides], tmp_path / "run"))


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["freeze=linear_probe", "augment=basic"], "augment=basic makes the training images random"),
        (["freeze=linear_probe", "augment.mixup_alpha=0.2"], "augment.mixup_alpha=0.2 mixes the images"),
        (["freeze=full"], "freeze=full trains the backbone, so its features change as it learns"),
        (["freeze=partial"], "freeze=partial trains the backbone"),
    ],
)
def test_true_is_refused_with_random_training_images_or_a_backbone_that_trains(tmp_path, overrides, why):
    with pytest.raises(ConfigError, match=f"model.cache_features=true cannot be: {why}"):
        parse(tmp_path, "augment=none", *overrides, "model.cache_features=true")


@pytest.fixture(scope="module")
def probe_config(tmp_path_factory) -> TrainConfig:
    """freeze=linear_probe augment=none: what auto caches; the other settings are made from it."""
    return parse(tmp_path_factory.mktemp("probe"), "freeze=linear_probe", "augment=none")


def with_changes(config: TrainConfig, cache_features: bool | str = "auto", **groups: dict) -> TrainConfig:
    changed = {group: parse_group(group, values) for group, values in groups.items()}
    return replace(config, model=replace(config.model, cache_features=cache_features), **changed)


def test_the_key_takes_auto_true_or_false(tmp_path, probe_config):
    assert probe_config.model.cache_features == "auto"
    frozen = ["freeze=partial", "freeze.trainable_blocks=0", "augment=none", "model.cache_features=true"]
    assert parse(tmp_path, *frozen).model.cache_features is True  # partial with 0 blocks: a linear probe
    with pytest.raises(ConfigError, match="model.cache_features='yes' is not valid; choose one of: auto"):
        replace(probe_config.model, cache_features="yes")


def test_auto_says_once_why_features_are_not_cached(probe_config, caplog):
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    caplog.set_level(logging.INFO, logger="transferlab.finetune.feature_cache")
    basic = with_changes(probe_config, augment={"name": "basic"})
    assert not use_feature_cache(basic, backbone, world_size=1)
    assert [r.getMessage() for r in caplog.records] == [
        "Backbone features are not cached (model.cache_features=auto): augment=basic makes the training "
        "images random, so their features differ every epoch (augment=none resizes and center-crops them "
        "like evaluation images)"
    ]
    caplog.clear()  # a backbone that trains: nothing to say; false: off, silently
    assert not use_feature_cache(with_changes(probe_config, freeze={"name": "full"}), backbone, 1)
    assert not use_feature_cache(with_changes(probe_config, False), backbone, world_size=1)
    assert not caplog.records
    # DDP: auto is off, true refused
    assert not use_feature_cache(probe_config, backbone, world_size=2)
    assert "the run has 2 processes (DDP)" in caplog.records[-1].getMessage()
    with pytest.raises(ConfigError, match=r"cache_features=true cannot be: the run has 2 processes"):
        use_feature_cache(with_changes(probe_config, True), backbone, world_size=2)
    caplog.clear()
    assert use_feature_cache(probe_config, backbone, world_size=1)
    assert "Backbone features are cached" in caplog.records[-1].getMessage()


def test_a_backbone_that_drops_at_random_is_not_cached(probe_config, caplog):
    """Dropout and stochastic depth stay active in a frozen backbone (only batch norm is set to eval)."""
    from torchvision.ops import StochasticDepth

    backbone = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), StochasticDepth(0.1, "row"), nn.Dropout(0.5))
    assert stochastic_layers(backbone) == ["2 (StochasticDepth)", "3 (Dropout)"]
    assert stochastic_layers(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0))) == []
    caplog.set_level(logging.INFO, logger="transferlab.finetune.feature_cache")
    assert not use_feature_cache(probe_config, backbone, world_size=1)
    assert "has layers that drop at random in training mode" in caplog.records[-1].getMessage()
    with pytest.raises(ConfigError, match=r"true cannot be: backbone resnet18 has layers that drop"):
        use_feature_cache(with_changes(probe_config, True), backbone, world_size=1)
