"""Freeze strategies over the backbone's stages (stem ... last stage, see backbones/stages.py).

- full: every stage trains from the first step.
- linear_probe: no stage trains; only the head does.
- partial: the last `trainable_blocks` stages train, the others never do.
- gradual: only the head trains until the first milestone epoch; each milestone then unfreezes
  `unfreeze_per_milestone` more stages from the top, and the last milestone unfreezes the rest.

Which stages train is a pure function of the epoch, so a resumed run recomputes the same state
from its restored epoch. Stages that never train are left out of the optimizer; stages that train
later are in it from the start (one fixed set of parameter groups for schedulers, DDP and
checkpoints) and get no gradient, and a learning rate of 0, until their milestone.

Batch norm: layers in frozen stages are always in eval mode (running statistics unchanged);
`bn` sets the trainable stages: train, eval, or auto = eval when starting from pretrained weights
(a few dozen images per batch give noisy statistics that would overwrite the pretrained ones)
and train from random initialisation (there are no statistics to keep).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback

from transferlab.backbones import Stage
from transferlab.config.schema import (
    FreezeConfig,
    GradualUnfreezeConfig,
    OptimConfig,
    PartialFinetuneConfig,
)
from transferlab.errors import ConfigError
from transferlab.finetune.optim import stage_lr_scales

log = logging.getLogger(__name__)

_BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


@dataclass(frozen=True)
class FreezePlan:
    strategy: str
    num_stages: int
    trainable_blocks: int = 0
    milestones: tuple[int, ...] = ()
    unfreeze_per_milestone: int = 1

    def unfreeze_epoch(self, stage: int) -> int | None:
        """The epoch from which `stage` (0 = stem) trains; None if it never does."""
        from_top = self.num_stages - 1 - stage
        if self.strategy == "full":
            return 0
        if self.strategy == "linear_probe":
            return None
        if self.strategy == "partial":
            return 0 if from_top < self.trainable_blocks else None
        index = min(from_top // self.unfreeze_per_milestone, len(self.milestones) - 1)
        return self.milestones[index]

    def trains(self, stage: int, epoch: int) -> bool:
        start = self.unfreeze_epoch(stage)
        return start is not None and epoch >= start

    def ever_trains(self, stage: int) -> bool:
        return self.unfreeze_epoch(stage) is not None


def freeze_plan(cfg: FreezeConfig, stage_names: Sequence[str]) -> FreezePlan:
    """The plan for this backbone; errors name the stages when a count does not fit."""
    count = len(stage_names)
    if isinstance(cfg, PartialFinetuneConfig) and cfg.trainable_blocks > count:
        raise ConfigError(
            f"freeze.trainable_blocks={cfg.trainable_blocks} but this backbone has {count} stages: "
            f"{', '.join(stage_names)}"
        )
    gradual = isinstance(cfg, GradualUnfreezeConfig)
    return FreezePlan(
        strategy=cfg.name,
        num_stages=count,
        trainable_blocks=cfg.trainable_blocks if isinstance(cfg, PartialFinetuneConfig) else 0,
        milestones=tuple(cfg.milestones) if gradual else (),
        unfreeze_per_milestone=cfg.unfreeze_per_milestone if gradual else 1,
    )


def resolve_bn_mode(bn: str, pretrained: bool) -> str:
    """auto: eval from pretrained weights, train from random ones. adapt: train from random weights; from
    pretrained ones eval until the run measures whether the images fit them (finetune.bn_fit)."""
    if bn in ("auto", "adapt"):
        return "eval" if pretrained else "train"
    return bn


class FrozenStages:
    """Which backbone parameters train at an epoch, applied to the module: requires_grad, batch-norm
    modes, and under DDP the gradients of stages that wait for their milestone."""

    def __init__(self, backbone: nn.Module, stages: list[Stage], plan: FreezePlan, bn_mode: str) -> None:
        self.backbone, self.stages, self.plan, self.bn_mode = backbone, stages, plan, bn_mode
        self.mask_grads = False  # under DDP, see enable_grad_masking
        self.frozen: set[str] = set()

    def apply(self, epoch: int, training: bool) -> None:
        """Make exactly the stages the plan trains at `epoch` trainable; the rest get no gradient."""
        frozen: set[str] = set()
        params = dict(self.backbone.named_parameters())
        for index, stage in enumerate(self.stages):
            trains = self.plan.trains(index, epoch)
            if not trains:
                frozen.update(stage.param_names)
            # Under DDP, stages that train later keep requires_grad (DDP only syncs what required
            # grad when it wrapped the model) and lose their gradient in drop_frozen_grads.
            keep = self.mask_grads and self.plan.ever_trains(index)
            for name in stage.param_names:
                params[name].requires_grad_(trains or keep)
        self.frozen = frozen
        if training:
            self.set_batchnorm_modes()

    def enable_grad_masking(self, epoch: int, training: bool) -> None:
        """Before DDP wraps the model: stages unfreezing later must require grad from the start."""
        self.mask_grads = True
        self.apply(epoch, training)

    def set_batchnorm_modes(self) -> None:
        set_batchnorm_modes(self.backbone, self.bn_mode, self.frozen)

    def drop_frozen_grads(self) -> None:
        """No gradient: the optimizer skips the parameter (no decay, no momentum)."""
        if self.mask_grads and self.frozen:
            for name, param in self.backbone.named_parameters():
                if name in self.frozen:
                    param.grad = None

    def describe(self, optim: OptimConfig) -> str:
        """The stages with their learning rate and when they train (logged when fitting starts)."""
        scales = stage_lr_scales(len(self.stages), optim.backbone_lr_mult, optim.layer_decay)
        lines = [
            f"  {i:>2} {stage.name:<40} lr {optim.lr * scale:<10.3g} "
            + _describe_unfreeze(self.plan.unfreeze_epoch(i))
            for i, (stage, scale) in enumerate(zip(self.stages, scales, strict=True))
        ]
        return (
            f"Freeze strategy {self.plan.strategy}, batch norm {self.bn_mode}; backbone stages (stem first):\n"
            + "\n".join(lines)
            + f"\n     head lr {optim.lr:.3g}"
        )


def _describe_unfreeze(epoch: int | None) -> str:
    return "frozen" if epoch is None else "trains" if epoch == 0 else f"trains from epoch {epoch}"


class FreezeCallback(Callback):
    """Runs the model's FrozenStages in every trainer that fits it (the model returns it from
    `configure_callbacks`): the epoch decides what is frozen, also right after a resume."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the strategy wraps the model in DistributedDataParallel
        frozen: FrozenStages = pl_module.frozen_stages
        if stage == "fit" and trainer.world_size > 1 and frozen.plan.strategy == "gradual":
            frozen.enable_grad_masking(epoch=0, training=pl_module.training)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("%s", pl_module.frozen_stages.describe(pl_module.optim_config))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores per-module modes after validation instead of calling train(), so the
        # batch-norm modes are set here too
        pl_module.frozen_stages.apply(trainer.current_epoch, training=True)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pl_module.frozen_stages.drop_frozen_grads()


def set_batchnorm_modes(backbone: nn.Module, bn: str, frozen_param_names: set[str]) -> None:
    """BN layers in frozen stages, or all of them with bn=eval, go to eval; while the backbone trains, the
    others go to train: a mode that changes to train (freeze.bn=adapt's measured choice, one stored in
    the checkpoint a run starts from) must reach layers an earlier mode put in eval, since Lightning
    restores each module's own mode rather than calling train() on the model."""
    for module_name, layer in backbone.named_modules():
        if not isinstance(layer, _BN_TYPES):
            continue
        if bn == "eval" or _is_frozen(module_name, frozen_param_names, backbone):
            layer.eval()
        elif backbone.training:
            layer.train()


def _is_frozen(module_name: str, frozen_param_names: set[str], backbone: nn.Module) -> bool:
    """A layer is frozen when its own parameters are; one without any (affine=False) follows its parent."""
    own = [f"{module_name}.{name}" for name, _ in backbone.get_submodule(module_name).named_parameters()]
    if own:
        return all(name in frozen_param_names for name in own)
    parent = module_name.rpartition(".")[0]
    siblings = [
        f"{parent}.{name}" if parent else name
        for name, _ in (backbone.get_submodule(parent) if parent else backbone).named_parameters()
    ]
    return bool(siblings) and all(name in frozen_param_names for name in siblings)
