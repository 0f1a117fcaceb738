"""Training augmentation: the `augment=` presets (per image) and mixup/cutmix (per batch).

Sizes, normalisation and interpolation come from the backbone's weights (`Preprocessing`); evaluation
never augments (`transforms.eval_transform`). A dataset can forbid what would change an image's label,
and every preset respects it: `data.allow_hflip=false` (digits: a mirrored digit is another glyph) and
`data.min_crop_scale` (digits: a crop of less than 80% of an 8x8 digit cuts strokes off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from transferlab.data.transforms import Preprocessing, eval_transform, interpolation_mode, normalize
from transferlab.errors import ConfigError

log = logging.getLogger(__name__)

PRESETS = ("none", "basic", "randaugment", "trivialaugment", "autoaugment")
AUTOAUGMENT_POLICIES = tuple(policy.value for policy in v2.AutoAugmentPolicy)  # imagenet, cifar10, svhn
_MAGNITUDE_BINS = 31  # torchvision's default for RandAugment and TrivialAugmentWide: magnitudes 0..30


def _number(augment: dict[str, Any], key: str, default: float) -> float:
    value = augment.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"augment.{key}={value!r} must be a number")
    return float(value)


def check_augment(augment: dict[str, Any]) -> None:
    """Fail before any data is read, naming the key and the valid values."""
    name = augment.get("name")
    if name not in PRESETS:
        raise ConfigError(f"augment.name={name!r} is not valid; choose one of: {', '.join(PRESETS)}")
    scale = augment.get("crop_scale", (0.5, 1.0))
    if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]) <= 1:
        raise ConfigError(f"augment.crop_scale={list(scale)} must be [low, high] with 0 < low <= high <= 1")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if _number(augment, key, 0.0) < 0:
            raise ConfigError(f"augment.{key}={augment[key]} must be >= 0 (0 turns it off)")
    if name == "randaugment":
        if not 0 <= _number(augment, "magnitude", 9) < _MAGNITUDE_BINS:
            raise ConfigError(f"augment.magnitude={augment['magnitude']} must be in 0..{_MAGNITUDE_BINS - 1}")
        if _number(augment, "num_ops", 2) < 0:
            raise ConfigError(f"augment.num_ops={augment['num_ops']} must be >= 0")
    if name == "autoaugment" and augment.get("policy", "imagenet") not in AUTOAUGMENT_POLICIES:
        raise ConfigError(
            f"augment.policy={augment['policy']!r} is not valid; choose one of: {', '.join(AUTOAUGMENT_POLICIES)}"
        )


def _policy(augment: dict[str, Any], prep: Preprocessing) -> list[v2.Transform]:
    """The preset's automatic augmentation, applied to uint8 images after crop and flip."""
    interpolation = interpolation_mode(prep.interpolation)
    name = augment["name"]
    if name == "randaugment":
        return [
            v2.RandAugment(
                num_ops=int(augment.get("num_ops", 2)),
                magnitude=int(augment.get("magnitude", 9)),
                interpolation=interpolation,
            )
        ]
    if name == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    if name == "autoaugment":
        policy = v2.AutoAugmentPolicy(augment.get("policy", "imagenet"))
        return [v2.AutoAugment(policy=policy, interpolation=interpolation)]
    return []


def train_transform(
    prep: Preprocessing,
    augment: dict[str, Any] | None,
    allow_hflip: bool = True,
    min_crop_scale: float | None = None,
) -> v2.Compose:
    """The preset's pipeline: random resized crop (+ flip) (+ RandAugment / TrivialAugment / AutoAugment),
    then the weights' normalisation. `none` (or no augment config) is the evaluation transform."""
    if not augment or augment.get("name", "none") == "none":
        return eval_transform(prep)
    check_augment(augment)
    low, high = (float(v) for v in augment.get("crop_scale", (0.5, 1.0)))
    if min_crop_scale is not None and low < float(min_crop_scale):
        low, high = float(min_crop_scale), max(high, float(min_crop_scale))
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RGB(),  # grayscale inputs (digits) become the 3 channels pretrained backbones expect
        v2.RandomResizedCrop(
            prep.crop_size,
            scale=(low, high),
            interpolation=interpolation_mode(prep.interpolation),
            antialias=True,
        ),
    ]
    if augment.get("hflip", True) and allow_hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _policy(augment, prep) + normalize(prep))


def batch_mixer(augment: dict[str, Any] | None, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix (one of the two per batch when both are on), or None when both alphas are 0."""
    augment = augment or {}
    mixers: list[v2.Transform] = []
    if float(augment.get("mixup_alpha", 0.0)) > 0:
        mixers.append(v2.MixUp(alpha=float(augment["mixup_alpha"]), num_classes=num_classes))
    if float(augment.get("cutmix_alpha", 0.0)) > 0:
        mixers.append(v2.CutMix(alpha=float(augment["cutmix_alpha"]), num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class MixingCollate:
    """A DataLoader `collate_fn`: stack the batch, then mix it; labels become (B, K) soft targets that sum to 1."""

    def __init__(self, mixer: Callable) -> None:
        self.mixer = mixer

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(batch)
        return self.mixer(images, labels)
