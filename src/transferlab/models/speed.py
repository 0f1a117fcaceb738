"""Speed options of the model (`model.compile`, `model.channels_last`), off by default."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from transferlab.config.schema import ModelConfig
from transferlab.errors import ConfigError

log = logging.getLogger(__name__)


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def smallest_conv_input(model: nn.Module, image_size: int) -> int | None:
    """The smallest height or width a 2-D convolution of `model` sees for one blank image of this size
    (None: no convolution). Modes and statistics are left as they were."""
    sizes: list[int] = []
    hooks = [
        module.register_forward_pre_hook(lambda _, args: sizes.append(min(args[0].shape[-2:])))
        for module in model.modules()
        if isinstance(module, nn.Conv2d)
    ]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return min(sizes, default=None)


def check_speed_options(model: nn.Module, options: ModelConfig, image_size: int, device_type: str) -> None:
    """torch.compile's backward of a channels_last convolution over a 1x1 feature map fails on CUDA with
    "AssertionError: expected size ..., stride ..." (inductor's convolution_backward stride prediction,
    pytorch/pytorch#171622; seen with torch 2.11 on an H100: ResNet-18 at 32 px fails, at 64 px trains):
    refused before training, naming what to change."""
    if not (options.compile and options.channels_last and device_type == "cuda"):
        return
    smallest = smallest_conv_input(model, image_size)
    if smallest == 1:
        raise ConfigError(
            f"model.compile=true with model.channels_last=true: at data.image_size={image_size} a convolution "
            "of this backbone sees a 1x1 feature map, where torch.compile's backward fails on CUDA "
            "(pytorch/pytorch#171622): raise data.image_size, or drop one of the two options"
        )


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
