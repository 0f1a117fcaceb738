"""Run directories: unique names, never reused, and atomic writes of the files in them."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# One id per process: stable for every resolution of `${run_uid:}` in this process, and two runs
# started in the same second (on any machine of a cluster) still get different directories.
_RUN_UID = secrets.token_hex(3)
OmegaConf.register_new_resolver("run_uid", lambda: _RUN_UID, replace=True)

RUN_MARKERS = (".hydra", "checkpoints", "metrics.json")


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


# `${slurm_or:<name>}`: the SLURM job's name when in a SLURM batch job, else <name> (time + id).
OmegaConf.register_new_resolver("slurm_or", lambda name: slurm_run_name() or name, replace=True)
# `${or_else:A,B}`: A unless it is null or empty, else B (`resume=<run dir>` or a new directory).
OmegaConf.register_new_resolver("or_else", lambda value, other: str(value) if value else other, replace=True)
# `${if_set:X,A,B}`: A when X is set, else B.
OmegaConf.register_new_resolver("if_set", lambda value, then, other: then if value else other, replace=True)


def is_multirun() -> bool:
    """True in the jobs of a Hydra sweep (-m), wherever the launcher runs them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def find_earlier_run(directory: str | os.PathLike) -> Path | None:
    """The first file or folder showing that `directory` already holds a run, if any."""
    for marker in RUN_MARKERS:
        path = Path(directory) / marker
        if path.exists():
            return path
    return None


class RunDirGuard(Callback):
    """Refuse to start a run in a directory that holds an earlier run (its config, checkpoints, metrics).

    Hydra turns exceptions raised in callbacks into warnings, so this one exits (SystemExit)
    before Hydra writes anything into the directory.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero_process():
            return  # processes that Lightning or srun start for DDP join the directory of rank 0
        run_dir = config.hydra.run.dir
        if config.get("resume"):
            self._check_resume(config.resume, run_dir, list(config.hydra.overrides.task))
            return
        earlier = find_earlier_run(run_dir)
        if earlier is not None and is_slurm_requeue() and Path(run_dir).name == slurm_run_name():
            return  # SLURM restarted this job: it continues from its own checkpoints
        if earlier is not None:
            raise SystemExit(
                f"Error: hydra.run.dir={run_dir} already holds a run ({earlier}); it is left untouched. "
                "Choose a new hydra.run.dir, or leave it unset for a fresh directory."
            )

    @staticmethod
    def _check_resume(resume: str, run_dir: str, overrides: list[str]) -> None:
        """`resume=<dir>` is the one case where a run starts in a directory that holds a run: its own."""
        from transferlab.resume import check_resumable, check_resume_overrides  # avoids an import cycle

        try:
            check_resumable(resume)
            check_resume_overrides(resume, overrides)
        except ValueError as error:
            raise SystemExit(f"Error: {error}") from None
        if Path(run_dir).resolve() != Path(resume).resolve():
            raise SystemExit(
                f"Error: resume={resume} continues the run in its own directory; remove hydra.run.dir={run_dir}."
            )


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
