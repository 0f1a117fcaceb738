"""Continuing runs: `resume=<run dir>`, SLURM requeues, and data/augmentation randomness that a resume reproduces."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transferlab.checkpoints import (
    checkpoint_dirs,
    checkpoint_epochs,
    checkpoint_step,
    last_checkpoint,
    read_checkpoint,
)
from transferlab.errors import ConfigError
from transferlab.runtime import is_slurm_requeue, override_key

log = logging.getLogger(__name__)

# What may be given together with resume=: extending the run is the one change that keeps it the same run.
RESUME_OVERRIDES = ("resume", "trainer.max_epochs")


def check_resumable(run_dir: str | Path, task: str) -> Path:
    """The run's last.ckpt; ConfigError naming what is missing otherwise, or that the run is another
    tool's (`task`: the resuming tool's task_name, train or pretrain)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"resume={run_dir}: no such directory (give the run's directory, e.g. outputs/runs/<run>)"
        )
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"resume={run_dir}: not a run directory (no .hydra/config.yaml)")
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    saved_task = saved.get("task_name")
    if saved_task and saved_task != task:
        raise ConfigError(
            f"resume={run_dir} is a {saved_task} run, which {task} cannot continue: "
            f"transferlab {saved_task} resume={run_dir}"
        )
    teacher = OmegaConf.select(saved, "distill.teacher")
    if teacher and not Path(teacher).expanduser().is_file():  # the teacher is in no checkpoint
        raise ConfigError(
            f"resume={run_dir}: the run distils from distill.teacher={teacher}, which is no longer there; "
            "put that checkpoint (or a link to it) back to continue the run"
        )
    ckpt = last_checkpoint(run_dir)
    if not ckpt.is_file():
        raise ConfigError(
            f"resume={run_dir}: no checkpoints/last.ckpt (the run ended before its first epoch); start it again"
        )
    _check_in_place(run_dir, ckpt)
    return ckpt


def _check_in_place(run_dir: Path, ckpt: Path) -> None:
    """A run continues where it was saved: moved or copied, its checkpoints still name the old folder
    (Lightning would neither find its best score nor keep best.ckpt in this one)."""
    here = (run_dir / "checkpoints").resolve()
    for saved in checkpoint_dirs(ckpt):
        if saved.resolve() != here:
            raise ConfigError(
                f"resume={run_dir}: this run was saved in {saved.parent} and has been moved or copied; resume= "
                f"continues a run in place. To go on from its weights and optimizer state in a new run: "
                f"ckpt_path={ckpt} trainer.max_epochs=..."
            )


def check_epochs_left(ckpt_path: str | Path, max_epochs: int, key: str) -> None:
    """A checkpoint that has completed trainer.max_epochs epochs would make fit() return at once, and the
    run would report metrics it did not train for."""
    done = checkpoint_epochs(read_checkpoint(ckpt_path, pretraining=True))
    if done >= max_epochs:
        raise ConfigError(
            f"{key}={ckpt_path} has completed {done} epochs, so trainer.max_epochs={max_epochs} leaves none "
            f"to train: set trainer.max_epochs above {done}"
        )


def check_resume_overrides(run_dir: str | Path, overrides: list[str]) -> None:
    """Only RESUME_OVERRIDES may come with resume=: anything else would make it another run."""
    refused = [o for o in overrides if override_key(o) not in RESUME_OVERRIDES]
    if refused:
        raise ConfigError(
            f"resume={run_dir} continues that run with its saved config; {' '.join(refused)} cannot be "
            f"changed (only {', '.join(RESUME_OVERRIDES[1:])}). To train with other settings from its "
            f"weights and optimizer state, start a new run: ckpt_path={last_checkpoint(run_dir)} ..."
        )


def resume_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The saved config of `cfg.resume`, continuing from its last.ckpt in its own directory.

    `overrides` are the ones typed on the command line: only RESUME_OVERRIDES are accepted.
    """
    run_dir = Path(cfg.resume)
    ckpt = check_resumable(run_dir, cfg.task_name)
    check_resume_overrides(run_dir, overrides)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    _update_moved_targets(saved)
    with open_dict(saved):
        saved.resume = str(run_dir)
        saved.ckpt_path = str(ckpt)
        if "init_from" in saved:  # train's key (not pretrain's): where the run started from, e.g. a
            saved.init_from = None  # pruned network; its last.ckpt holds that network now
        saved.paths.output_dir = str(run_dir)
        if any(override_key(o) == "trainer.max_epochs" for o in overrides):
            saved.trainer.max_epochs = cfg.trainer.max_epochs
    log.info("Resuming %s from %s", run_dir, ckpt)
    return saved


# `_target_`s of our classes that moved since a run could have saved its config (issue 11's restructuring)
MOVED_TARGETS = {"transferlab.checkpoint_io.AtomicCheckpointIO": "transferlab.files.AtomicCheckpointIO"}


def _update_moved_targets(node: Any) -> None:
    """A saved config names classes where they were when it was saved: point it at where they are now."""
    if isinstance(node, DictConfig):
        for key, value in node.items():
            if key == "_target_" and value in MOVED_TARGETS:
                node[key] = MOVED_TARGETS[value]
            else:
                _update_moved_targets(value)
    elif isinstance(node, ListConfig):
        for item in node:
            _update_moved_targets(item)


def requeued_checkpoint(output_dir: str | Path) -> Path | None:
    """After a SLURM requeue: the run's most advanced checkpoint, Lightning's hpc_ckpt_N.ckpt (saved at the
    requeue signal) or our last.ckpt (end of an epoch), whichever has more steps (last.ckpt on a tie:
    it ends an epoch, so the data order stays exact). None when this is not a requeued SLURM job."""
    if not is_slurm_requeue():
        return None
    output_dir = Path(output_dir)
    candidates = [last_checkpoint(output_dir), *output_dir.glob("hpc_ckpt_*.ckpt")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        return None
    return max(found, key=lambda path: (checkpoint_step(path), path.name == "last.ckpt"))


def start_checkpoint(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """What fit() starts from: after a SLURM requeue, the job's own most advanced checkpoint (its progress
    supersedes the ckpt_path or resume= it was started with); otherwise ckpt_path."""
    requeued = requeued_checkpoint(output_dir)
    if requeued is None:
        return ckpt_path
    log.info("SLURM requeued this job: continuing from %s", requeued)
    return str(requeued)


class ReseedEachEpoch(Callback):
    """Seed every RNG from (seed, epoch, rank) when a training epoch starts.

    The epoch's shuffling (the loader's sampler draws its seed from torch's RNG when the epoch's
    iterator is made, after this hook), augmentation and dropout then depend only on the epoch,
    so a run resumed from a checkpoint sees the same data as an uninterrupted one. Exact with
    data.num_workers=0; persistent workers keep their own RNG state, which a resume restarts.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entropy = [self.seed, trainer.current_epoch, trainer.global_rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also every CUDA device
