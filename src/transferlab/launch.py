"""Launch rules: runs and sweeps that cannot work are refused before they start (Hydra callbacks
in conf/hydra/default.yaml, and the check each training job makes).

- a run or sweep starts only in a new or empty directory, which it claims atomically (two runs started
  together on one directory: one of them is refused), except `resume=` of that run and a SLURM job
  restarted after a requeue;
- a sweep job may not let Lightning start DDP processes (they would re-run the whole sweep);
- the SLURM launcher's tasks and nodes must be the trainer's devices and nodes.

Hydra turns exceptions raised in callbacks into warnings, so the callbacks exit (SystemExit).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf

from transferlab.config.parse import trainer_arg
from transferlab.errors import ConfigError
from transferlab.files import SWEEP_RECORD
from transferlab.resume import check_resumable, check_resume_overrides
from transferlab.runtime import is_rank_zero_process, is_slurm_requeue, slurm_run_name

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
RUN_MARKERS = (".hydra", "checkpoints", "metrics.json")


def claim_directory(directory: str | Path, marker: str) -> Path:
    """Make `directory` ours before anything is written into it: created if missing, refused when it is
    not an empty folder (it may be the user's), and claimed by creating `marker` in it exclusively (a
    folder, or a file when its name has a suffix), so that of two runs started together on one directory
    exactly one proceeds. Returns the marker's path."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a directory: choose another output directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        entries = sorted(os.listdir(path))
        if entries:
            raise ConfigError(
                f"{path} already exists and is not empty (it holds {entries[0]!r}); it is left untouched. "
                "Choose a new directory, or leave it unset for a fresh one (resume=<run dir> continues a run)"
            )
        claim = path / marker
        if claim.suffix:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        else:
            claim.mkdir()
        return claim
    except FileExistsError:
        raise ConfigError(
            f"{path} was just claimed by another run started at the same time; it is left to it"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"cannot create the output directory {error.filename or path}: {error.strerror}. Choose a writable "
            "paths.output_root (or hydra.run.dir)"
        ) from None


LOCK_FILE = ".hydra/run.lock"
_held_locks: dict[Path, int] = {}  # run directory -> the open lock file this process holds


def lock_run(run_dir: str | Path) -> None:
    """Hold an exclusive lock on the run directory while this process runs in it, so that a resume= of
    a run that is still running (or two resumes started together) is refused. The operating system
    releases it when the process ends, however it ends: a crash leaves no stale lock."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{run_dir} is in use: another run (or resume=) is running in it now. Wait for it to end"
        ) from None
    _held_locks[Path(run_dir)] = fd


def release_run_locks() -> None:
    """Release the locks this process holds (at the end of a run made in this process: tests, demo)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


def find_earlier_run(directory: str | Path) -> Path | None:
    """The first file or folder showing that `directory` already holds a run, if any."""
    for marker in RUN_MARKERS:
        path = Path(directory) / marker
        if path.exists():
            return path
    return None


class RunDirGuard(HydraCallback):
    """Claim the run directory before Hydra writes anything into it (`claim_directory`; its marker is
    Hydra's own `.hydra` folder), or refuse; a resumed or requeued run continues in its own directory."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero_process():
            return  # processes that Lightning or srun start for DDP join the directory of rank 0
        run_dir = config.hydra.run.dir
        if config.get("resume"):
            self._check_resume(config.resume, run_dir, list(config.hydra.overrides.task), config.task_name)
            self._lock(run_dir)
            return
        earlier = find_earlier_run(run_dir)
        if earlier is not None and is_slurm_requeue() and Path(run_dir).name == slurm_run_name():
            self._lock(run_dir)
            return  # SLURM restarted this job: it continues from its own checkpoints
        if earlier is not None:
            resume = f", or resume={run_dir} to continue it" if "resume" in config else ""  # train, pretrain
            raise SystemExit(
                f"Error: hydra.run.dir={run_dir} already holds a run ({earlier}); it is left untouched. "
                f"Choose a new hydra.run.dir or leave it unset for a fresh directory{resume}."
            )
        try:
            claim_directory(run_dir, marker=str(config.hydra.output_subdir or ".hydra"))
        except ConfigError as error:
            raise SystemExit(f"Error: hydra.run.dir: {error}") from None
        self._lock(run_dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_run_locks()

    @staticmethod
    def _lock(run_dir: str) -> None:
        try:
            lock_run(run_dir)
        except ConfigError as error:
            raise SystemExit(f"Error: {error}") from None

    @staticmethod
    def _check_resume(resume: str, run_dir: str, overrides: list[str], task: str) -> None:
        """`resume=<dir>` is the one case where a run starts in a directory that holds a run: its own."""
        try:
            check_resumable(resume, task)
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
    if not str(devices).isdigit():
        raise ConfigError(
            f"trainer.devices={devices!r} is not valid: a number of devices (2), a list of ids ([0,1]) or auto"
        )
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


def check_job_directories(config: DictConfig) -> None:
    """Each job of a sweep needs a directory of its own inside the sweep's: a subdir without the job's
    number would put every job in one directory (the first job's files replaced by the next one's), an
    absolute one could be any folder of yours. Relative paths in the config assume no chdir."""
    subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"])
    if "hydra.job.num" not in subdir or Path(subdir).is_absolute():
        raise ConfigError(
            f"hydra.sweep.subdir={subdir} must be a relative path holding ${{hydra.job.num}} (the default): "
            "each job of a sweep writes into a directory of its own"
        )


def check_no_chdir(hydra: DictConfig) -> None:
    """`hydra`: the run's hydra node."""
    if hydra.job.chdir:
        raise ConfigError(
            "hydra.job.chdir=true is not supported: data.root, ckpt_path and weight files given relative "
            "to where you start the command would be looked up in the run directory. Leave it false"
        )


def check_sweep_launch(config: DictConfig) -> None:
    """The checks a sweep gets before its first job: its job directories, no chdir, SLURM resources, or
    no Lightning-started processes."""
    check_job_directories(config)
    check_no_chdir(config.hydra)
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


def check_single_run(hydra: DictConfig) -> None:
    """A sweeper or launcher chosen for a run without -m would be ignored by Hydra: the run would
    happen here, once, as if they had not been asked for. `hydra`: the run's hydra node (a Hydra
    callback's `config.hydra`, or `HydraConfig.get()` within a task)."""
    choices = hydra.runtime.choices
    check_no_chdir(hydra)
    if hydra.sweeper["_target_"] != BASIC_SWEEPER:
        raise ConfigError(
            f"hparams_search={choices.get('hparams_search')} runs a sweep: add -m "
            f"(python train.py -m hparams_search={choices.get('hparams_search')} ...)"
        )
    if hydra.launcher["_target_"] != BASIC_LAUNCHER:
        raise ConfigError(
            f"hydra/launcher={choices.get('hydra/launcher')} launches the jobs of a sweep: add -m "
            "(a sweep of one job is fine), or leave the launcher out to run here"
        )


def check_jobs_run_here(hydra: DictConfig) -> None:
    """`check -m`: each job of the sweep is checked here, one after another. A search (Optuna) picks its
    trials from the results of earlier ones, which a check has none of; a launcher would send the checks
    elsewhere."""
    choices = hydra.runtime.choices
    if hydra.sweeper["_target_"] != BASIC_SWEEPER:
        raise ConfigError(
            f"hparams_search={choices.get('hparams_search')}: check -m checks the jobs a sweep lists, and a "
            "search picks its trials from results a check does not produce; leave hparams_search out and "
            "sweep the values to check (e.g. optim.lr=0.001,0.1)"
        )
    if hydra.launcher["_target_"] != BASIC_LAUNCHER:
        raise ConfigError(
            f"hydra/launcher={choices.get('hydra/launcher')}: check runs its checks here; leave the launcher out"
        )


class ChecksRunHere(HydraCallback):
    """check -m's launch rule (`check_jobs_run_here`), before any job. Exits (SystemExit), as
    `LaunchChecks` does."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_jobs_run_here(config.hydra)
        except ConfigError as error:
            raise SystemExit(f"Error: {error}") from None


class LaunchChecks(HydraCallback):
    """Checks a sweep before any job is launched or submitted, and a single run for settings only a
    sweep reads. Exits (SystemExit) because Hydra turns exceptions raised in callbacks into warnings.
    Swept values (trainer.devices=1,2) are checked per job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_single_run(config.hydra)
        except ConfigError as error:
            raise SystemExit(f"Error: {error}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep_launch(config)
        except ConfigError as error:
            raise SystemExit(f"Error: {error}") from None
        try:  # its job directories are numbered from 0: an earlier sweep's would be written over
            claim = claim_directory(config.hydra.sweep.dir, marker=SWEEP_RECORD)
        except ConfigError as error:
            raise SystemExit(f"Error: hydra.sweep.dir: {error}") from None
        OmegaConf.save(config, claim)  # what Hydra's basic sweeper writes there too; Optuna's does not
