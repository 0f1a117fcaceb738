"""Callbacks that tests add to CLI runs (`+callbacks.<name>._target_=tests.callbacks.<Class>`; importable
from the repository root, where the runs start): PauseAt holds a run at a chosen batch until the test has
signalled it, so that the signal lands mid-epoch at a known step; RankState saves what each DDP process
holds, which the test process cannot see."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def pause_at(marker: Path, epoch: int, batch: int) -> list[str]:
    """The train.py overrides that add PauseAt."""
    return [
        "+callbacks.pause._target_=tests.callbacks.PauseAt",
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


def rank_states(folder: Path) -> list[str]:
    """The train.py overrides that add RankState."""
    return [
        "+callbacks.rank_state._target_=tests.callbacks.RankState",
        f"+callbacks.rank_state.folder={folder}",
    ]


class RankState(Callback):
    """Each process writes its backbone's state when training starts (`rank<r>_start.pt`) and at the end
    of every epoch (`rank<r>_epoch<e>.pt`)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _save(self, trainer: L.Trainer, pl_module, name: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.backbone.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}_{name}.pt")

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")
