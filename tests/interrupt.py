"""Test helper for interrupted runs: a callback that holds a training run at a chosen batch until the
test has signalled it, so that the signal lands mid-epoch at a known step, not at a moment that timing picks."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


def pause_at(marker: Path, epoch: int, batch: int) -> list[str]:
    """The train.py overrides that add PauseAt (importable as tests.interrupt from the repository root)."""
    return [
        "+callbacks.pause._target_=tests.interrupt.PauseAt",
        f"+callbacks.pause.marker={marker}",
        f"+callbacks.pause.epoch={epoch}",
        f"+callbacks.pause.batch={batch}",
    ]


class PauseAt(Callback):
    """After training batch `batch` of epoch `epoch`: create `marker`, then wait until Lightning has seen
    SIGTERM (or the process is killed), at most `timeout` seconds. Only once: a resumed run whose saved
    config still holds this callback finds the marker and goes on."""

    def __init__(self, marker: str, epoch: int, batch: int, timeout: float = 120) -> None:
        self.marker, self.epoch, self.batch, self.timeout = Path(marker), epoch, batch, timeout

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or self.marker.exists():
            return
        self.marker.touch()
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)
