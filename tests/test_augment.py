"""Augmentation presets and mixup/cutmix: what each pipeline holds, soft targets, and the config rules."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from tests.conftest import compose_config, data_config, validate
from transferlab.config import parse_group
from transferlab.config.store import OPTIONS
from transferlab.data.augment import MixingCollate, batch_mixer, train_transform
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing, eval_transform
from transferlab.errors import ConfigError
from transferlab.training import train

TINY = Preprocessing(crop_size=16, resize_size=18)
DIGITS = {"name": "digits", "split_seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "num_workers": 0}


PRESETS = tuple(OPTIONS["augment"])


def preset(name: str, **extra):
    return parse_group("augment", {"name": name, **extra})


def kinds(pipeline: v2.Compose) -> list[type]:
    return [type(t) for t in pipeline.transforms]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_gives_normalised_images_of_the_weights_size(name):
    image = torch.randint(0, 256, (1, 40, 30), dtype=torch.uint8)  # grayscale, not square
    out = train_transform(TINY, preset(name))(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_what_each_preset_holds():
    assert kinds(train_transform(TINY, preset("none"))) == kinds(eval_transform(TINY))
    basic = kinds(train_transform(TINY, preset("basic")))
    assert v2.RandomResizedCrop in basic and v2.RandomHorizontalFlip in basic
    for name, policy in (
        ("randaugment", v2.RandAugment),
        ("trivialaugment", v2.TrivialAugmentWide),
        ("autoaugment", v2.AutoAugment),
    ):
        steps = kinds(train_transform(TINY, preset(name)))
        assert policy in steps and steps.index(policy) > steps.index(v2.RandomResizedCrop)
        assert steps.index(policy) < steps.index(v2.ToDtype)  # the policies work on uint8 images
    for pipeline in (eval_transform(TINY),):
        assert not {v2.RandomResizedCrop, v2.RandomHorizontalFlip} & set(kinds(pipeline))


def test_the_data_can_forbid_flips_and_small_crops():
    pipeline = train_transform(TINY, preset("randaugment"), allow_hflip=False, min_crop_scale=0.8)
    assert v2.RandomHorizontalFlip not in kinds(pipeline)
    crop = next(t for t in pipeline.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.8, 1.0)


def test_digits_keep_their_recipe_after_the_move(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.augment.name == "basic" and cfg.augment.hflip is True
    assert cfg.data.allow_hflip is False and cfg.data.min_crop_scale == 0.8
    dm = TransferDataModule(
        data_config({**DIGITS, "allow_hflip": False, "min_crop_scale": 0.8}),
        TINY,
        augment=parse_group("augment", cfg.augment),
    )
    pipeline = dm.train_dataloader().dataset.transform
    assert v2.RandomHorizontalFlip not in kinds(pipeline)
    assert next(t for t in pipeline.transforms if isinstance(t, v2.RandomResizedCrop)).scale == (0.8, 1.0)
    imagefolder = compose_config(["data=imagefolder", "data.root=/x"], tmp_path)
    assert imagefolder.data.allow_hflip is True and imagefolder.data.min_crop_scale is None


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "augment.name=cutout",
            "augment.name='cutout'.*none, basic, randaugment, trivialaugment, autoaugment",
        ),
        ("augment.crop_scale=[0.9,0.2]", "augment.crop_scale"),
        ("augment.mixup_alpha=-1", "augment.mixup_alpha=-1"),
        ("augment=randaugment augment.magnitude=31", "augment.magnitude=31"),
        ("augment=autoaugment augment.policy=mnist", "augment.policy='mnist'.*imagenet, cifar10, svhn"),
    ],
)
def test_bad_augment_values_name_the_key(override, pattern, tmp_path):
    cfg = compose_config(["backbone.weights=null", *override.split()], tmp_path)
    with pytest.raises(ConfigError, match=pattern):
        validate(cfg)


def test_mixup_and_cutmix_make_soft_targets_that_sum_to_one():
    torch.manual_seed(0)
    batch = [(torch.randn(3, 8, 8), label) for label in (0, 1, 2, 3, 0, 1)]
    for augment in (
        preset("basic", mixup_alpha=0.2),
        preset("basic", cutmix_alpha=1.0),
        preset("basic", mixup_alpha=0.2, cutmix_alpha=1.0),
    ):
        images, targets = MixingCollate(batch_mixer(augment, num_classes=5))(batch)
        assert images.shape == (6, 3, 8, 8) and targets.shape == (6, 5)
        assert torch.allclose(targets.sum(dim=1), torch.ones(6))
        assert (targets[:, 4] == 0).all()  # only the classes in the batch get weight
        assert (targets.max(dim=1).values < 1).any()  # mixed, not one-hot
    assert batch_mixer(preset("basic"), 5) is None
    assert isinstance(batch_mixer(preset("basic", mixup_alpha=0.2, cutmix_alpha=1.0), 5), v2.RandomChoice)


@pytest.mark.parametrize("name", PRESETS)
def test_evaluation_never_augments_whatever_the_preset(name):
    augment = preset(name, mixup_alpha=0.2, cutmix_alpha=1.0)
    dm = TransferDataModule(data_config({**DIGITS, "batch_size": 8}), TINY, augment=augment)
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.split_dataloader("train")):
        assert kinds(loader.dataset.transform) == kinds(eval_transform(TINY))
        assert not isinstance(loader.collate_fn, MixingCollate)
        torch.manual_seed(0)
        first = next(iter(loader))
        torch.manual_seed(1)
        second = next(iter(loader))
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_mixup_batches_reach_the_loader(tmp_path):
    dm = TransferDataModule(
        data_config({**DIGITS, "batch_size": 8}), TINY, augment=preset("trivialaugment", mixup_alpha=0.4)
    )
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and targets.shape == (8, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    _, hard = next(iter(dm.val_dataloader()))  # evaluation never mixes
    assert hard.dtype == torch.int64 and hard.dim() == 1


def test_a_run_with_mixup_cutmix_and_label_smoothing(fast_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(
        fast_cfg(
            "augment=trivialaugment",
            "augment.mixup_alpha=0.2",
            "augment.cutmix_alpha=1.0",
            "loss.label_smoothing=0.1",
        )
    )
    assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["val/f1"] <= 1
    tags = set()
    for events in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert "train/loss_step" in tags and "val/acc" in tags
    assert "train/acc" not in tags  # accuracy against soft targets is skipped, not faked


def test_check_augment_accepts_every_shipped_preset(tmp_path):
    for name in PRESETS:
        assert parse_group("augment", compose_config([f"augment={name}"], tmp_path).augment).name == name
