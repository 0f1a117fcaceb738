"""Freeze strategies: `none` fine-tunes everything, `backbone` trains only the head.

Frozen parameters get `requires_grad=False` and are left out of the optimizer; batch-norm layers
in frozen parts stay in eval mode so their running statistics never change. `bn=eval` also keeps
batch-norm statistics of trainable parts fixed, which is what small datasets need: a few dozen
images per batch give noisy statistics that would overwrite the pretrained ones.
"""

from __future__ import annotations

import torch.nn as nn

from transferlab.errors import ConfigError

STRATEGIES = ("none", "backbone")
BN_MODES = ("train", "eval")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def check_freeze(strategy: str, bn: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"freeze.name={strategy!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    if bn not in BN_MODES:
        raise ConfigError(f"freeze.bn={bn!r} is not valid; choose one of: {', '.join(BN_MODES)}")


def apply_freeze(backbone: nn.Module, strategy: str) -> None:
    """Set `requires_grad` according to the strategy."""
    frozen = strategy == "backbone"
    for param in backbone.parameters():
        param.requires_grad_(not frozen)


def set_batchnorm_modes(backbone: nn.Module, bn: str) -> None:
    """After `module.train()`: BN layers whose parameters are frozen, or all of them with bn=eval, go to eval."""
    for layer in backbone.modules():
        if not isinstance(layer, _BN_TYPES):
            continue
        frozen = not any(p.requires_grad for p in layer.parameters(recurse=False))
        if frozen or bn == "eval":
            layer.eval()
