"""A Lightning callback for benchmarks/overhead.py: wall-clock marks (time.time()) of a train.py run's
phases, written as JSON when the process's test ends. Added on the command line:
`+callbacks.phase_timer._target_=phase_timer.PhaseTimer +callbacks.phase_timer.path=<file>`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L


class PhaseTimer(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.epochs: list[dict[str, float]] = []
        self.marks: dict[str, Any] = {}

    def _close_epoch(self) -> None:
        if self.epochs and "ckpt_end" not in self.epochs[-1]:
            self.epochs[-1]["ckpt_end"] = time.time()  # the checkpoints are saved after validation

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._close_epoch()
        self.epochs.append({"train_start": time.time()})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.epochs[-1].setdefault("first_batch", time.time())  # the batch is in hand: the step starts

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking and self.epochs and trainer.state.fn == "fit":
            now = time.time()
            self.epochs[-1].update(train_end=now, val_start=now)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking and self.epochs and trainer.state.fn == "fit":
            self.epochs[-1]["val_end"] = time.time()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._close_epoch()

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.marks["test_start"] = time.time()

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.marks["test_end"] = time.time()
        self.path.write_text(json.dumps({**self.marks, "epochs": self.epochs}))
