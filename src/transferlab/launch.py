"""Launch rules: runs and sweeps that cannot work are refused before they start (Hydra callbacks
in conf/hydra/default.yaml, and the check each training job makes).

- a run never starts in a directory that holds an earlier run (except `resume=` of that run, and a
  SLURM job restarted after a requeue);
- a sweep job may not let Lightning start DDP processes (they would re-run the whole sweep);
- the SLURM launcher's tasks and nodes must be the trainer's devices and nodes.

Hydra turns exceptions raised in callbacks into warnings, so the callbacks exit (SystemExit).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig

from transferlab.config.parse import trainer_arg
from transferlab.errors import ConfigError
from transferlab.resume import check_resumable, check_resume_overrides
from transferlab.runtime import is_rank_zero_process, is_slurm_requeue, slurm_run_name

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
RUN_MARKERS = (".hydra", "checkpoints", "metrics.json")


def find_earlier_run(directory: str | Path) -> Path | None:
    """The first file or folder showing that `directory` already holds a run, if any."""
    for marker in RUN_MARKERS:
        path = Path(directory) / marker
        if path.exists():
            return path
    return None


class RunDirGuard(HydraCallback):
    """Refuse to start a run in a directory that holds an earlier run (its config, checkpoints, metrics),
    before Hydra writes anything into it."""

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
        try:
            check_resumable(resume)
            check_resume_overrides(resume, overrides)
        except ConfigError as error:
            raise SystemExit(f"Error: {error}") from None
        if Path(run_dir).resolve() != Path(resume).resolve():
            raise SystemExit(
                f"Error: resume={resume} continues the run in its own directory; remove hydra.run.dir={run_dir}."
            )


def _device_count(devices: Any, accelerator: str) -> int:
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if str(devices) in ("-1", "auto"):
        return 1 if accelerator == "cpu" else max(1, torch.cuda.device_count())
    return int(devices)


def processes_launched_by_lightning(trainer: Mapping[str, Any]) -> int:
    """How many processes Lightning would start by re-running the command line (0: none)."""
    strategy = str(trainer_arg(trainer, "strategy"))
    if any(word in strategy for word in ("spawn", "fork", "notebook")):
        return 0  # multiprocessing children: they do not re-run the command line
    if SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return 0  # SLURM (srun) or torchrun started every process already
    count = _device_count(trainer_arg(trainer, "devices"), str(trainer_arg(trainer, "accelerator")))
    count *= int(trainer_arg(trainer, "num_nodes"))
    return count if count > 1 else 0


def check_multirun_processes(trainer: Mapping[str, Any], multirun: bool) -> None:
    """Refuse a sweep job whose trainer would start DDP processes itself.

    Lightning starts them by re-running sys.argv, which holds -m and the sweep: each child would launch
    the whole sweep again.
    """
    processes = processes_launched_by_lightning(trainer)
    if multirun and processes:
        raise ConfigError(
            f"trainer.strategy={trainer_arg(trainer, 'strategy')} with trainer.devices="
            f"{trainer_arg(trainer, 'devices')} and trainer.num_nodes={trainer_arg(trainer, 'num_nodes')} starts {processes} processes by re-running "
            "the command, which in a sweep (-m) would re-run the sweep in each of them. Use "
            "hydra/launcher=slurm (SLURM starts one task per device), or run each configuration as a "
            "single run without -m."
        )


def check_sweep_launch(config: DictConfig) -> None:
    """The checks a sweep gets before its first job: SLURM resources, or no Lightning-started processes."""
    if config.hydra.launcher["_target_"] == SLURM_LAUNCHER:
        check_submitit_resources(config)
    else:  # jobs run here (basic) or one process each (submitit_local): Lightning would re-run the sweep
        check_multirun_processes(config.trainer, multirun=True)


def check_submitit_resources(config: DictConfig) -> None:
    """tasks_per_node must be trainer.devices and nodes trainer.num_nodes: Lightning runs one process per
    task. The launcher's resources are the same for every job, so a sweep cannot vary them."""
    launcher, trainer = config.hydra.launcher, config.trainer
    if not str(trainer_arg(trainer, "devices")).isdigit():
        raise ConfigError(
            f"trainer.devices={trainer_arg(trainer, 'devices')} with hydra/launcher=slurm: set the number of devices "
            "per node (trainer.devices=4), which is also the number of SLURM tasks per node"
        )
    pairs = (("tasks_per_node", "devices"), ("nodes", "num_nodes"))
    for launcher_key, trainer_key in pairs:
        if str(launcher[launcher_key]) != str(trainer_arg(trainer, trainer_key)):
            raise ConfigError(
                f"hydra.launcher.{launcher_key}={launcher[launcher_key]} but "
                f"trainer.{trainer_key}={trainer_arg(trainer, trainer_key)}: Lightning runs one process per SLURM task, "
                f"so they must be equal. Set trainer.{trainer_key} (the launcher follows it) and leave "
                f"hydra.launcher.{launcher_key} unset."
            )
    swept = [
        o
        for o in config.hydra.overrides.task
        if o.split("=", 1)[0] in ("trainer.devices", "trainer.num_nodes") and "," in o.split("=", 1)[-1]
    ]
    if swept:
        raise ConfigError(
            f"{' '.join(swept)}: the submitit launcher requests the same resources for every job of a "
            "sweep; launch one sweep per value instead."
        )


class LaunchChecks(HydraCallback):
    """Checks a sweep before any job is launched or submitted. Exits (SystemExit) because Hydra turns
    exceptions raised in callbacks into warnings. Swept values (trainer.devices=1,2) are checked per job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep_launch(config)
        except ConfigError as error:
            raise SystemExit(f"Error: {error}") from None
