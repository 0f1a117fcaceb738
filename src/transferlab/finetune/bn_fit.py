"""freeze.bn=adapt: keep a pretrained backbone's batch-norm statistics only when the new images fit them.

Frozen statistics that do not fit the new data shift every activation, and at the head's learning rate
that collapses a run (EfficientNet-Lite0's ImageNet statistics on upsampled digits: chance accuracy);
statistics that do fit (a backbone pretrained on related images) are worth keeping with a few labelled
images (experiments/imagenet_transfer: 4 points at 2 labels per class). Which case a run is in shows in
the statistics themselves (AdaBN, Li et al. 2016): before training, a few batches of training images
(evaluation transform) go through the backbone in eval mode, and each batch-norm layer's input mean is
compared with its running mean, in units of its running standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# The mean standardised shift above which the statistics are updated. Measured (4 batches of 32): 0.75
# for ImageNet statistics on digits, 0.15-0.18 for a digits 0-4 backbone on digits 5-9, at 2, 10 and all
# labels per class; 0.4 lies between them with a margin on both sides.
SHIFT_THRESHOLD = 0.4
MEASURED_BATCHES = 4


def statistics_shift(backbone: nn.Module, batches: Iterable[torch.Tensor]) -> float | None:
    """Mean over batch-norm layers and channels of |input mean - running mean| / running std, on these
    image batches, in eval mode (the running statistics are not touched); None without batch norm."""
    layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = [m for m in layers if m.running_mean is not None]
    if not layers:
        return None
    sums: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        sums[module].append(inputs[0].detach().float().transpose(0, 1).flatten(1).mean(1))

    handles = [m.register_forward_hook(record) for m in layers]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for images in batches:
                backbone(images)
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    shifts = []
    for m in layers:
        if sums[m]:
            mean = torch.stack(sums[m]).mean(0)
            std = (m.running_var.float() + m.eps).sqrt()
            shifts.append(((mean - m.running_mean.float()).abs() / std).mean())
    return float(torch.stack(shifts).mean()) if shifts else None


def adapted_bn_mode(shift: float | None) -> str:
    """eval (keep the statistics) when they fit the images, train (update them) when they do not."""
    return "eval" if shift is not None and shift <= SHIFT_THRESHOLD else "train"
