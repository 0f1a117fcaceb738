"""Knowledge distillation (Hinton et al., 2015): a frozen teacher's softened class probabilities as a
second target for the student (`distill.*`, built by `build.load_teacher`).

loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)); the T^2
keeps the soft term's gradients on the scale of the hard one's as T grows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_loss: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, the soft term T^2 * KL) for a batch; `label_loss` is the usual loss against the labels
    (class indices or the soft targets of mixup/cutmix)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=1)
    soft = F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2
    return alpha * label_loss + (1 - alpha) * soft, soft


class Teacher:
    """A frozen classifier in eval mode whose logits are the student's soft targets. Not an nn.Module
    attribute of the student, so it is in none of the student's checkpoints, optimizer groups, train/eval
    switches or weight averages (deep copies share it)."""

    def __init__(
        self, network: nn.Module, student_preprocessing: dict[str, Any], preprocessing: dict[str, Any]
    ):
        self.network = network.eval().requires_grad_(False)
        self._convert = _needs_conversion(student_preprocessing, preprocessing)
        self._student, self._own = student_preprocessing, preprocessing

    def __deepcopy__(self, memo: dict) -> Teacher:
        return self

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for the student's batch (same augmented images, through the teacher's own
        normalisation and input size when they differ); no autograd graph, so no gradient memory. The
        network follows the batch's device and, under a `*-true` precision (Lightning casts each batch
        to it, not this network, which is no module of the student's), its dtype."""
        weight = next(self.network.parameters())
        if weight.device != images.device or weight.dtype != images.dtype:
            self.network.to(device=images.device, dtype=images.dtype)
        if self._convert:
            images = to_teacher_input(images, self._student, self._own)
        return self.network(images)


def _needs_conversion(student: dict[str, Any], teacher: dict[str, Any]) -> bool:
    keys = ("mean", "std", "crop_size")
    return any(tuple(_as_list(student[k])) != tuple(_as_list(teacher[k])) for k in keys)


def _as_list(value: Any) -> list[float]:
    return list(value) if isinstance(value, list | tuple) else [value]


def to_teacher_input(images: torch.Tensor, student: dict[str, Any], teacher: dict[str, Any]) -> torch.Tensor:
    """A batch normalised for the student, normalised for the teacher instead and resized to its crop size."""

    def column(values: Any) -> torch.Tensor:
        return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    pixels = images * column(student["std"]) + column(student["mean"])
    converted = (pixels - column(teacher["mean"])) / column(teacher["std"])
    size = int(teacher["crop_size"])
    if converted.shape[-1] != size or converted.shape[-2] != size:
        converted = F.interpolate(
            converted, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return converted
