"""`ema.enabled=true`: an exponential moving average (EMA) of the weights is the model a run evaluates and
checkpoints.

Lightning's `WeightAveraging` callback does the work: it keeps a `torch.optim.swa_utils.AveragedModel`
(parameters and buffers, so batch-norm statistics too), updates it after every optimizer step, swaps it in
for each validation epoch (so `val/*`, hence best.ckpt's choice, are the average's), and writes it as the
checkpoint's `state_dict` (the raw weights go to `current_model_state`, the number of updates to
`averaging_state`, the last updated step to the callback's state). That makes best.ckpt's `state_dict`,
which eval, predict, export and analyze load, the averaged network, and `resume=` continues both the
raw weights and the average exactly.

What it lacks, added here:
- a decay warm-up. A fine-tune here is short (10 epochs of about 20 steps: ~200 updates); with a fixed
  decay of 0.999 the average would still carry ~80% of its first weights after 200 updates, i.e. stay near
  the start of the fine-tune. We use the `num_updates` rule of TensorFlow's `ExponentialMovingAverage`:
  decay_t = min(decay, (1 + n) / (10 + n)) after n updates. Early on the average follows the weights
  (decay 0.18 at the second update), and it averages over roughly the last tenth of the run at any length,
  without a step count to tune per run as "start averaging after N steps" would need. It depends only on
  the AveragedModel's update count, which the checkpoint keeps: resuming continues the same schedule.
- integer buffers (batch norm's `num_batches_tracked`) are copied, not averaged (an average of counters
  truncated back to an integer never grows).
- after fit, `trainer.validate` / `trainer.test` of best.ckpt must evaluate that file's `state_dict`
  (the average): Lightning's callback, still holding the fit's average, would reload the raw weights
  from `current_model_state` and swap again. Outside fit this callback does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from transferlab.config.schema import EMAConfig

log = logging.getLogger(__name__)

WARMUP_OFFSET = 10  # decay_t = min(decay, (1 + n) / (WARMUP_OFFSET + n))


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of the update that follows `updates` earlier ones (the first update copies the weights)."""
    if not warmup:
        return decay
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


def ema_multi_avg_fn(decay: float, warmup: bool) -> Callable[[list, list, torch.Tensor], None]:
    """An `AveragedModel` `multi_avg_fn`: average <- decay_t * average + (1 - decay_t) * weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(decay, int(updates), warmup))
        else:  # counters (num_batches_tracked): the model's own
            for average, weights in zip(averaged, current, strict=True):
                average.copy_(weights)

    return update


class EMAWeights(WeightAveraging):
    """Lightning's weight averaging with our EMA (decay warm-up), updated after every optimizer step."""

    def __init__(self, config: EMAConfig) -> None:
        super().__init__(use_buffers=True, multi_avg_fn=ema_multi_avg_fn(config.decay, config.warmup))
        self.config = config

    @property
    def average(self) -> torch.nn.Module | None:
        """The averaged LightningModule during fit (None before and after)."""
        return None if self._average_model is None else self._average_model.module

    @property
    def updates(self) -> int:
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None  # every optimizer step, never at epoch ends

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)
            log.info(
                "EMA of the weights (decay %s%s) is validated and checkpointed as the model",
                self.config.decay,
                ", warm-up min(decay, (1 + n) / (10 + n))" if self.config.warmup else "",
            )
        else:
            # after fit the module holds the average (Lightning copies it in at the end of fit), and a
            # checkpoint's state_dict is the average: nothing to swap, nothing to restore
            self._average_model = None

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is not None:  # fit (resume=, ckpt_path=): the average and the raw weights
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
