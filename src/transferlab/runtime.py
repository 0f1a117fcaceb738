"""Facts about the process a run is in: its rank, SLURM, a Hydra multirun, the CPUs it may use; how much
the libraries it runs may log."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator


def slurm_run_name() -> str | None:
    """`slurm-<job id>` in a SLURM batch job: the same name when SLURM requeues the job, so the
    requeued job finds its own checkpoints. None outside SLURM and in interactive allocations."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"slurm-{array_job}_{array_task}" if array_job and array_task else f"slurm-{job_id}"


def is_slurm_requeue() -> bool:
    """SLURM sets SLURM_RESTART_COUNT when it restarts a requeued job."""
    return slurm_run_name() is not None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def is_rank_zero_process() -> bool:
    """False in the processes that Lightning (LOCAL_RANK) or srun (SLURM_PROCID) start besides rank 0."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def is_multirun() -> bool:
    """True in the jobs of a Hydra sweep (-m), wherever the launcher runs them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def override_key(override: str) -> str:
    """The key an override sets: `+data.root=/x` -> data.root, `~logger` -> logger."""
    return override.split("=", 1)[0].lstrip("+~")


def command_line_overrides() -> list[str]:
    """The task overrides typed for this Hydra run (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def usable_cpu_count() -> int:
    """CPUs this process may run on (a SLURM job or `taskset` gets fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def quiet_loggers(names: Iterable[str], level: int = logging.WARNING) -> Iterator[None]:
    """These loggers at `level` and above only, for the block (a library's step-by-step info lines)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for logger, saved in zip(loggers, levels, strict=True):
            logger.setLevel(saved)


@contextlib.contextmanager
def quiet_root_logger_calls(level: int = logging.WARNING) -> Iterator[None]:
    """Records below `level` logged on the root logger itself (a library's `logging.info(...)`) are dropped
    for the block. A logger's filters see only the records logged on it, so those of named loggers, which
    pass through the root's handlers, are kept."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= level

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
