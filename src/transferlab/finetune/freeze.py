"""Freeze strategies over the backbone's stages (stem ... last stage, see models/stages.py).

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

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from transferlab.errors import ConfigError

STRATEGIES = ("full", "linear_probe", "partial", "gradual")
ALIASES = {"none": "full", "backbone": "linear_probe"}  # the names of the first release
BN_MODES = ("auto", "train", "eval")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def strategy_name(cfg: dict[str, Any]) -> str:
    name = cfg.get("name", "full")
    return ALIASES.get(name, name)


def _int_at_least(value: Any, key: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


def check_freeze(cfg: dict[str, Any], max_epochs: int | None = None) -> None:
    """Checks that need no model: names, milestones and their order, counts."""
    name = strategy_name(cfg)
    if name not in STRATEGIES:
        valid = ", ".join([*STRATEGIES, *ALIASES])
        raise ConfigError(f"freeze.name={cfg.get('name')!r} is not valid; choose one of: {valid}")
    if cfg.get("bn", "auto") not in BN_MODES:
        raise ConfigError(f"freeze.bn={cfg.get('bn')!r} is not valid; choose one of: {', '.join(BN_MODES)}")
    if name == "partial":
        _int_at_least(cfg.get("trainable_blocks"), "freeze.trainable_blocks", 0)
    if name == "gradual":
        milestones = list(cfg.get("milestones") or [])
        if not milestones:
            raise ConfigError("freeze=gradual needs freeze.milestones, e.g. freeze.milestones=[2,5]")
        for value in milestones:
            _int_at_least(value, "freeze.milestones entry", 1)
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ConfigError(f"freeze.milestones={milestones} must be strictly increasing epochs")
        if max_epochs is not None and max_epochs > 0 and milestones[-1] >= max_epochs:
            raise ConfigError(
                f"freeze.milestones={milestones}: epoch {milestones[-1]} is past the last epoch "
                f"(trainer.max_epochs={max_epochs} trains epochs 0..{max_epochs - 1})"
            )
        _int_at_least(cfg.get("unfreeze_per_milestone", 1), "freeze.unfreeze_per_milestone", 1)


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


def freeze_plan(cfg: dict[str, Any], stage_names: Sequence[str]) -> FreezePlan:
    """The plan for this backbone; errors name the stages when a count does not fit."""
    check_freeze(cfg)
    name, count = strategy_name(cfg), len(stage_names)
    trainable = int(cfg.get("trainable_blocks") or 0)
    if name == "partial" and trainable > count:
        raise ConfigError(
            f"freeze.trainable_blocks={trainable} but this backbone has {count} stages: "
            f"{', '.join(stage_names)}"
        )
    return FreezePlan(
        strategy=name,
        num_stages=count,
        trainable_blocks=trainable,
        milestones=tuple(cfg.get("milestones") or ()),
        unfreeze_per_milestone=int(cfg.get("unfreeze_per_milestone", 1)),
    )


def resolve_bn_mode(bn: str, pretrained: bool) -> str:
    if bn == "auto":
        return "eval" if pretrained else "train"
    return bn


def set_batchnorm_modes(backbone: nn.Module, bn: str, frozen_param_names: set[str]) -> None:
    """After `module.train()`: BN layers in frozen stages, or all of them with bn=eval, go to eval."""
    for module_name, layer in backbone.named_modules():
        if not isinstance(layer, _BN_TYPES):
            continue
        if bn == "eval" or _is_frozen(module_name, frozen_param_names, backbone):
            layer.eval()


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
