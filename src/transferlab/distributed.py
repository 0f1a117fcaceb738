"""Multi-process rules: exact evaluation under DDP, and launches that cannot work refused before they start."""

from __future__ import annotations

from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from transferlab.errors import ConfigError

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def exact_eval_loader(loader: DataLoader, trainer: Any) -> DataLoader:
    """Under DDP, the same loader with each sample on exactly one process.

    Lightning would give evaluation loaders a DistributedSampler, which pads the last ranks with
    duplicates so that every rank gets as many batches: val/test metrics would count those twice.
    Lightning keeps a sampler that already is a DistributedSampler, so this one stays. Ranks may then
    see different numbers of batches, which evaluation allows (no gradient sync); metrics and logged
    means are summed over processes (torchmetrics states, Lightning's batch-size weighted means).
    """
    if trainer is None or trainer.world_size <= 1:
        return loader
    sampler = UnrepeatedDistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
    )


def _device_count(devices: Any, accelerator: str) -> int:
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if str(devices) in ("-1", "auto"):
        return 1 if accelerator == "cpu" else max(1, torch.cuda.device_count())
    return int(devices)


def processes_launched_by_lightning(trainer: DictConfig) -> int:
    """How many processes Lightning would start by re-running the command line (0: none)."""
    strategy = str(trainer.get("strategy", "auto"))
    if any(word in strategy for word in ("spawn", "fork", "notebook")):
        return 0  # multiprocessing children: they do not re-run the command line
    if SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return 0  # SLURM (srun) or torchrun started every process already
    count = _device_count(trainer.get("devices", 1), str(trainer.get("accelerator", "auto")))
    count *= int(trainer.get("num_nodes", 1))
    return count if count > 1 else 0


def check_multirun_processes(trainer: DictConfig, multirun: bool) -> None:
    """Refuse a sweep job whose trainer would start DDP processes itself.

    Lightning starts them by re-running sys.argv, which holds -m and the sweep: each child would launch
    the whole sweep again.
    """
    processes = processes_launched_by_lightning(trainer)
    if multirun and processes:
        raise ConfigError(
            f"trainer.strategy={trainer.get('strategy')} with trainer.devices={trainer.get('devices')} "
            f"and trainer.num_nodes={trainer.get('num_nodes')} starts {processes} processes by re-running "
            "the command, which in a sweep (-m) would re-run the sweep in each of them. Use "
            "hydra/launcher=slurm (SLURM starts one task per device), or run each configuration as a "
            "single run without -m."
        )


def check_sweep_launch(config: DictConfig) -> None:
    """The checks a sweep gets before its first job: SLURM resources, or no Lightning-started processes."""
    if config.hydra.launcher.get("_target_") == SLURM_LAUNCHER:
        check_submitit_resources(config)
    else:  # jobs run here (basic) or one process each (submitit_local): Lightning would re-run the sweep
        check_multirun_processes(config.trainer, multirun=True)


def check_submitit_resources(config: DictConfig) -> None:
    """tasks_per_node must be trainer.devices and nodes trainer.num_nodes: Lightning runs one process per
    task. The launcher's resources are the same for every job, so a sweep cannot vary them."""
    launcher, trainer = config.hydra.launcher, config.trainer
    if not str(trainer.get("devices")).isdigit():
        raise ConfigError(
            f"trainer.devices={trainer.get('devices')} with hydra/launcher=slurm: set the number of devices "
            "per node (trainer.devices=4), which is also the number of SLURM tasks per node"
        )
    pairs = (("tasks_per_node", "devices"), ("nodes", "num_nodes"))
    for launcher_key, trainer_key in pairs:
        if str(launcher.get(launcher_key)) != str(trainer.get(trainer_key)):
            raise ConfigError(
                f"hydra.launcher.{launcher_key}={launcher.get(launcher_key)} but "
                f"trainer.{trainer_key}={trainer.get(trainer_key)}: Lightning runs one process per SLURM task, "
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
