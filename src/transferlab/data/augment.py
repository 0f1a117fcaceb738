"""Training augmentation: the `augment=` presets (per image) and mixup/cutmix (per batch).

Sizes, normalisation and interpolation come from the backbone's weights (`Preprocessing`); evaluation
never augments (`transforms.eval_transform`). A dataset can forbid what would change an image's label,
and every preset respects it: `data.allow_hflip=false` (digits: a mirrored digit is another glyph) and
`data.min_crop_scale` (digits: a crop of less than 80% of an 8x8 digit cuts strokes off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from transferlab.config.schema import (
    AugmentConfig,
    AutoAugmentConfig,
    NoAugmentConfig,
    RandAugmentConfig,
    SimCLRConfig,
    TrivialAugmentConfig,
)
from transferlab.data.transforms import Preprocessing, eval_transform, interpolation_mode, normalize

log = logging.getLogger(__name__)


def _policy(augment: AugmentConfig, prep: Preprocessing) -> list[v2.Transform]:
    """The preset's automatic augmentation, applied to uint8 images after crop and flip."""
    interpolation = interpolation_mode(prep.interpolation)
    if isinstance(augment, RandAugmentConfig):
        return [v2.RandAugment(augment.num_ops, augment.magnitude, interpolation=interpolation)]
    if isinstance(augment, TrivialAugmentConfig):
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    if isinstance(augment, AutoAugmentConfig):
        return [v2.AutoAugment(v2.AutoAugmentPolicy(augment.policy), interpolation=interpolation)]
    return []


def train_transform(
    prep: Preprocessing,
    augment: AugmentConfig | None,
    allow_hflip: bool = True,
    min_crop_scale: float | None = None,
) -> v2.Compose:
    """The preset's pipeline: random resized crop (+ flip) (+ RandAugment / TrivialAugment / AutoAugment),
    then the weights' normalisation. `none` (or no augment config) is the evaluation transform."""
    if augment is None or isinstance(augment, NoAugmentConfig):
        return eval_transform(prep)
    low, high = (float(v) for v in augment.crop_scale)
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
    if augment.hflip and allow_hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _policy(augment, prep) + normalize(prep))


def batch_mixer(augment: AugmentConfig | None, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix (one of the two per batch when both are on), or None when both alphas are 0."""
    mixers: list[v2.Transform] = []
    if augment is not None and augment.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
    if augment is not None and augment.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
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


def contrastive_view(
    prep: Preprocessing, method: SimCLRConfig, allow_hflip: bool = True, min_crop_scale: float | None = None
) -> v2.Compose:
    """One random view for SimCLR (Chen et al., 2020): crop, flip, colour jitter, grayscale, normalise."""
    low, high = (float(v) for v in method.crop_scale)
    if min_crop_scale is not None and low < float(min_crop_scale):
        low, high = float(min_crop_scale), max(high, float(min_crop_scale))
    strength = method.color_jitter
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(
            prep.crop_size,
            scale=(low, high),
            interpolation=interpolation_mode(prep.interpolation),
            antialias=True,
        ),
    ]
    if allow_hflip:
        steps.append(v2.RandomHorizontalFlip())
    if strength > 0:
        jitter = v2.ColorJitter(strength, strength, strength, min(0.5, strength / 4))
        steps.append(v2.RandomApply([jitter], p=0.8))
    steps.append(v2.RandomGrayscale(p=method.grayscale_p))
    return v2.Compose(steps + normalize(prep))


class TwoViews:
    """A dataset transform giving two independent random views of an image, stacked: (2, C, H, W)."""

    def __init__(self, view: Callable) -> None:
        self.view = view

    def __call__(self, image: object) -> torch.Tensor:
        return torch.stack([self.view(image), self.view(image)])
