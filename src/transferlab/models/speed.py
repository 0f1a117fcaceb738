"""Speed options of the model (`model.compile`, `model.channels_last`), off by default."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from transferlab.config.schema import ModelConfig

log = logging.getLogger(__name__)


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def apply_speed_options(model: nn.Module, options: ModelConfig) -> None:
    """channels_last: NHWC weights and inputs (faster convolutions on GPUs, mostly with mixed precision).
    compile: torch.compile of the backbone in place (parameter names, hence checkpoints, unchanged)."""
    backbone = model.backbone
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(_to_channels_last)  # the batch, whatever the loader made
        log.info("model.channels_last: weights and inputs in NHWC memory format")
    if options.compile:
        backbone.compile()
        log.info("model.compile: the backbone is compiled with torch.compile on its first batch")
