"""Preprocessing that travels with the weights, and the evaluation transform built from it.

Training transforms (the `augment=` presets) are in `augment.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone's weights expect: crop size, resize size, normalisation, interpolation."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def with_overrides(
        self,
        image_size: int | None = None,
        mean: Any = None,
        std: Any = None,
        interpolation: str | None = None,
    ) -> Preprocessing:
        """Apply `data.*` overrides; a new image size keeps the weights' resize/crop ratio."""
        updated = self
        if image_size is not None:
            ratio = self.resize_size / self.crop_size
            updated = replace(updated, crop_size=int(image_size), resize_size=round(int(image_size) * ratio))
        if mean is not None:
            updated = replace(updated, mean=tuple(float(m) for m in mean))
        if std is not None:
            updated = replace(updated, std=tuple(float(s) for s in std))
        if interpolation is not None:
            updated = replace(updated, interpolation=str(interpolation))
        return updated

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types, so checkpoints holding it load with `weights_only=True`."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            crop_size=int(values["crop_size"]),
            resize_size=int(values["resize_size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            interpolation=str(values["interpolation"]),
        )


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision mode of an interpolation name (the schema's INTERPOLATIONS, as the weights use them)."""
    return InterpolationMode(name)


def normalize(prep: Preprocessing) -> list[v2.Transform]:
    """uint8 image to float, normalised with the weights' mean and std."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(prep.mean), std=list(prep.std))]


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """Deterministic: resize, center crop, normalise; exactly what the weights were evaluated with."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),  # grayscale inputs (digits) become the 3 channels pretrained backbones expect
            v2.Resize(prep.resize_size, interpolation=interpolation_mode(prep.interpolation), antialias=True),
            v2.CenterCrop(prep.crop_size),
            *normalize(prep),
        ]
    )
