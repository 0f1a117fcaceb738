"""Optimizer and learning-rate schedule from the `optim/` and `scheduler/` configs.

Parameter groups: backbone and head, each split into decayed weights and the biases and
normalisation weights that get no weight decay. The backbone's learning rate is
`optim.lr * optim.backbone_lr_mult`. Frozen parameters are not in any group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from hydra.utils import get_class

from transferlab.errors import ConfigError

# Keys of optim/*.yaml that are ours, not keyword arguments of the torch optimizer.
OUR_OPTIM_KEYS = ("_target_", "backbone_lr_mult", "no_decay_norm_bias")
SCHEDULERS = ("none", "cosine", "step")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")  # biases and norm-layer scales/shifts


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    lr: float,
    backbone_lr_mult: float,
    weight_decay: float,
    no_decay_norm_bias: bool,
) -> list[dict[str, Any]]:
    groups = []
    for part, module, part_lr in (("backbone", backbone, lr * backbone_lr_mult), ("head", head, lr)):
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if no_decay_norm_bias and _no_decay(name, param) else decay).append(param)
        if decay:
            groups.append({"name": part, "params": decay, "lr": part_lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append(
                {"name": f"{part}_no_decay", "params": no_decay, "lr": part_lr, "weight_decay": 0.0}
            )
    return groups


def build_optimizer(cfg: dict[str, Any], backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    target = cfg.get("_target_")
    try:
        optimizer_cls = get_class(target)
    except Exception:
        raise ConfigError(f"optim._target_={target!r} is not an importable optimizer class") from None
    kwargs = {k: v for k, v in cfg.items() if k not in OUR_OPTIM_KEYS}
    if kwargs.get("lr", 0) <= 0:
        raise ConfigError(f"optim.lr={kwargs.get('lr')!r} must be a positive number")
    groups = param_groups(
        backbone,
        head,
        lr=kwargs["lr"],
        backbone_lr_mult=cfg.get("backbone_lr_mult", 1.0),
        weight_decay=kwargs.get("weight_decay", 0.0),
        no_decay_norm_bias=cfg.get("no_decay_norm_bias", True),
    )
    return optimizer_cls(groups, **kwargs)


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float, start_ratio: float
) -> float:
    """Linear warmup from `start_ratio` to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    cfg: dict[str, Any], optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> dict[str, Any] | None:
    """A Lightning `lr_scheduler` config, or None for a constant learning rate."""
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name == "cosine":
        warmup_steps = round(cfg.get("warmup_epochs", 0) * steps_per_epoch)
        min_ratio, start_ratio = cfg.get("min_lr_ratio", 0.0), cfg.get("warmup_start_ratio", 0.01)

        def factor(step: int) -> float:
            return warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio, start_ratio)

        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}
    if name == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.get("step_size", 10), gamma=cfg.get("gamma", 0.1)
        )
        return {"scheduler": scheduler, "interval": "epoch"}
    raise ConfigError(f"scheduler.name={name!r} is not valid; choose one of: {', '.join(SCHEDULERS)}")
