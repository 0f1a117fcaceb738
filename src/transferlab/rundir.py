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
# Cached in the config: Hydra copies the cache into each sweep job's config, so a job that runs in
# another process (submitit) resolves the same sweep directory as the process that launched it.
_RUN_UID = secrets.token_hex(3)
OmegaConf.register_new_resolver("run_uid", lambda: _RUN_UID, replace=True, use_cache=True)

RUN_MARKERS = (".hydra", "checkpoints", "metrics.json")


def is_rank_zero_process() -> bool:
    """False in the processes that Lightning (LOCAL_RANK) or srun (SLURM_PROCID) start besides rank 0."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


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
        earlier = find_earlier_run(run_dir)
        if earlier is not None:
            raise SystemExit(
                f"Error: hydra.run.dir={run_dir} already holds a run ({earlier}); it is left untouched. "
                "Choose a new hydra.run.dir, or leave it unset for a fresh directory."
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
