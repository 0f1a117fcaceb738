"""Optimizer and learning-rate schedule from the `optim/` and `scheduler/` configs.

Parameter groups: one per backbone stage that ever trains, and the head; each split into decayed
weights and the biases and normalisation weights that get no weight decay. Learning rates:
head `optim.lr`; stage i of n `optim.lr * backbone_lr_mult * layer_decay ** (n - i)`, so the last
stage gets one decay step and the stem n. The groups never change during a run: a stage that
unfreezes later is in the optimizer from the start, with a learning rate of 0 until its epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from hydra.utils import get_class

from transferlab.config.schema import (
    ConstantScheduleConfig,
    CosineScheduleConfig,
    OneCycleScheduleConfig,
    OptimConfig,
    PlateauScheduleConfig,
    SchedulerConfig,
    StepScheduleConfig,
    metric_direction,
)


@dataclass
class StageParams:
    name: str
    params: list[tuple[str, nn.Parameter]]
    unfreeze_epoch: int | None  # None: never trains (left out of the optimizer)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")  # biases and norm-layer scales/shifts


def stage_lr_scales(num_stages: int, backbone_lr_mult: float, layer_decay: float | None) -> list[float]:
    """LR multiplier of each stage (stem first) relative to the head's."""
    decay = 1.0 if layer_decay is None else layer_decay
    return [backbone_lr_mult * decay ** (num_stages - i) for i in range(num_stages)]


def param_groups(stages: Sequence[StageParams], head: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The optimizer's groups; each carries `unfreeze_epoch` (0 for the head) for the scheduler."""
    lr, weight_decay, split = cfg.lr, cfg.weight_decay, cfg.no_decay_norm_bias
    scales = stage_lr_scales(len(stages), cfg.backbone_lr_mult, cfg.layer_decay)
    parts = [
        (f"backbone.{i}.{stage.name}", stage.params, lr * scale, stage.unfreeze_epoch)
        for i, (stage, scale) in enumerate(zip(stages, scales, strict=True))
    ]
    parts.append(("head", list(head.named_parameters()), lr, 0))
    groups = []
    for name, params, group_lr, unfreeze_epoch in parts:
        if unfreeze_epoch is None:
            continue
        decay = [p for n, p in params if not (split and _no_decay(n, p))]
        no_decay = [p for n, p in params if split and _no_decay(n, p)]
        for suffix, members, group_decay in (("", decay, weight_decay), (".no_decay", no_decay, 0.0)):
            if members:
                groups.append(
                    {
                        "name": name + suffix,
                        "params": members,
                        "lr": group_lr,
                        "weight_decay": group_decay,
                        "unfreeze_epoch": unfreeze_epoch,
                    }
                )
    return groups


def build_optimizer(
    cfg: OptimConfig, stages: Sequence[StageParams], head: nn.Module
) -> torch.optim.Optimizer:
    return get_class(cfg._target_)(param_groups(stages, head, cfg), **cfg.optimizer_kwargs())


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float, start_ratio: float
) -> float:
    """Linear warmup from `start_ratio` to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def onecycle_factor(step: int, total_steps: int, pct_start: float, div: float, final_div: float) -> float:
    """OneCycleLR's learning-rate curve (cosine annealing): lr/div up to lr, then down to lr/(div*final_div)."""
    up_steps = max(1, round(pct_start * total_steps))
    start, end = 1.0 / div, 1.0 / (div * final_div)
    if step < up_steps:
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * step / up_steps))
    progress = min(1.0, (step - up_steps) / max(1, total_steps - up_steps))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_factor(cfg: SchedulerConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The LR multiplier at each optimizer step for the step-based schedules."""
    if isinstance(cfg, CosineScheduleConfig):
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        min_ratio, start_ratio = cfg.min_lr_ratio, cfg.warmup_start_ratio
        return lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio, start_ratio)
    if isinstance(cfg, OneCycleScheduleConfig):
        pct, div, final_div = cfg.pct_start, cfg.div_factor, cfg.final_div_factor
        return lambda step: onecycle_factor(step, total_steps, pct, div, final_div)
    if isinstance(cfg, StepScheduleConfig):
        size, gamma = cfg.step_size, cfg.gamma
        return lambda step: gamma ** ((step // steps_per_epoch) // size)
    return lambda step: 1.0


def _gated(factor: Callable[[int], float], start_step: int) -> Callable[[int], float]:
    """A group's multiplier: the schedule's, times 0 before the group's unfreeze step. A plain function
    on purpose: LambdaLR leaves functions out of its state_dict, so checkpoints stay weights_only-loadable."""
    return lambda step: factor(step) if step >= start_step else 0.0


def optimizers_for(trainer: Any, cfg: SchedulerConfig, optimizer: torch.optim.Optimizer) -> Any:
    """`configure_optimizers`' return: the optimizer, with `cfg`'s schedule over the run's steps when it
    has one."""
    total_steps = int(trainer.estimated_stepping_batches)
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    scheduler = build_scheduler(cfg, optimizer, total_steps, max(1, math.ceil(total_steps / max_epochs)))
    return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}


def build_scheduler(
    cfg: SchedulerConfig,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
) -> dict[str, Any] | None:
    """A Lightning `lr_scheduler` config, or None for a constant learning rate with nothing to gate."""
    if isinstance(cfg, PlateauScheduleConfig):
        # Frozen groups keep their nominal LR here; they get no gradient, so no update either.
        mode = cfg.mode or metric_direction(cfg.monitor)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience
        )
        return {"scheduler": scheduler, "interval": "epoch", "monitor": cfg.monitor}
    factor = schedule_factor(cfg, total_steps, steps_per_epoch)
    starts = [group["unfreeze_epoch"] * steps_per_epoch for group in optimizer.param_groups]
    if isinstance(cfg, ConstantScheduleConfig) and not any(starts):
        return None
    lambdas = [_gated(factor, start) for start in starts]
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), "interval": "step"}
