"""The classification loss: cross-entropy or multi-class softmax focal loss, optionally class-weighted.

Both take class indices (B,) or soft targets (B, K) (mixup/cutmix batches) and apply label smoothing
to either, as `nn.CrossEntropyLoss` does: targets * (1 - eps) + eps / K.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from transferlab.config.schema import LossConfig
from transferlab.errors import ConfigError

LOSSES = ("cross_entropy", "focal")


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017): mean over the batch of -sum_c w_c y_c (1 - p_c)^gamma log p_c.

    torchvision's `sigmoid_focal_loss` is the binary (sigmoid) form; this is the multi-class one. The mean
    follows `F.cross_entropy`: weighted by the targets' class weights for class indices, plain for soft
    targets; so gamma=0 gives exactly `F.cross_entropy(logits, targets, weight, label_smoothing=...)`.
    """
    num_classes = logits.shape[1]
    log_probs = logits.float().log_softmax(dim=1)
    hard = targets.dim() == 1
    probs = F.one_hot(targets, num_classes).float() if hard else targets.float()
    if label_smoothing > 0:
        probs = probs * (1.0 - label_smoothing) + label_smoothing / num_classes
    class_weight = weight.float() if weight is not None else torch.ones_like(log_probs[0])
    modulation = (1.0 - log_probs.exp()).pow(gamma)  # easy (confident, right) predictions count less
    per_image = -(probs * class_weight * modulation * log_probs).sum(dim=1)
    if hard and weight is not None:
        return per_image.sum() / class_weight[targets].sum()
    return per_image.mean()


class ClassificationLoss(nn.Module):
    """`loss.name` (cross_entropy | focal) with `loss.class_weights`, `loss.label_smoothing`, `loss.focal_gamma`.

    The class weights are a non-persistent buffer: they follow the module to the GPU but stay out of the
    state dict (checkpoints keep them in the hyperparameters), so checkpoints load whatever the loss.
    """

    def __init__(
        self,
        name: str,
        class_weights: list[float] | None,
        label_smoothing: float,
        focal_gamma: float,
    ) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ConfigError(f"loss.name={name!r} is not valid; choose one of: {', '.join(LOSSES)}")
        self.name, self.label_smoothing, self.focal_gamma = name, float(label_smoothing), float(focal_gamma)
        weight = torch.tensor(class_weights, dtype=torch.float) if class_weights is not None else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.name == "focal":
            return focal_loss(logits, targets, self.focal_gamma, self.weight, self.label_smoothing)
        return F.cross_entropy(logits, targets, weight=self.weight, label_smoothing=self.label_smoothing)


def loss_from_hyperparameters(loss: dict[str, Any] | None) -> ClassificationLoss:
    """A run's loss from its stored `loss.*` keys (a checkpoint's hyperparameters): plain cross-entropy
    unless said otherwise; checkpoints from before the imbalance options hold only loss.label_smoothing."""
    spec = {"name": "cross_entropy", "class_weights": None, **asdict(LossConfig()), **(loss or {})}
    return ClassificationLoss(**spec)
