"""Class imbalance (`data.imbalance`): class weights for the loss, or sample weights for the sampler.

- `class_weights`: cross-entropy weighted by N / (K * n_c) (scikit-learn's "balanced"): a class with
  half the average count weighs twice as much; on the training data the mean weight per image is 1.
- `sampler`: a `WeightedRandomSampler` draws each image with probability proportional to 1 / n_c, so
  every class is drawn equally often in expectation; an epoch has as many draws as training images
  (or `data.min_batches_per_epoch` batches, when that is more).
- `focal`: the focal loss (`models/losses.py`, `loss.focal_gamma`), which down-weights easy images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def class_weights(counts: Sequence[int]) -> list[float]:
    """N / (K * n_c) for each class c; every class must have at least one image."""
    counts = np.asarray(counts, dtype=np.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs training images to weigh it; counts: {counts.tolist()}")
    return (counts.sum() / (len(counts) * counts)).tolist()


def balanced_sampler(labels: np.ndarray, num_classes: int, draws: int | None = None) -> WeightedRandomSampler:
    """Draws image i with probability proportional to 1 / n_{label(i)}, with replacement, `draws` times
    per epoch (default: as many as there are images)."""
    counts = np.bincount(labels, minlength=num_classes)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), draws or len(labels), replacement=True
    )
