"""Launching processes: DDP on 2 CPU processes (gloo) under Hydra, and the launches refused before they start."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tests.callbacks import rank_states
from tests.conftest import FAST, compose_config, data_config, run_cli, run_tool
from tests.test_sweeps import SWEEP
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.launch import check_multirun_processes, check_submitit_resources, check_sweep_launch
from transferlab.models.classifier import ImageClassifier

# whole val/test splits, 109 images each: odd, so a padding DistributedSampler would count one twice
DDP_DATA = [o for o in FAST if not o.startswith(("trainer.limit_val", "trainer.limit_test"))]
DDP_DATA += ["data.classes=[0,1,3]"]
SCALARS = ("val/acc", "val/loss", "val/f1", "val/precision", "val/recall", "test/acc", "test/loss", "test/f1")


def evaluate_in_one_process(ckpt: Path) -> dict[str, float]:
    """val and test metrics of a checkpoint, one process, the checkpoint's own data."""
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    stored = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]
    datamodule = TransferDataModule(
        data_config(stored["data"]), Preprocessing.from_dict(stored["preprocessing"])
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    metrics |= trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics["test_count"] = int(model.test_confusion.sum())
    return metrics


def test_ddp_two_processes_report_the_metrics_of_one_process_and_unfreeze_in_sync(tmp_path, tmp_path_factory):
    """Two CPU processes (gloo), the head alone in epoch 0, the backbone joining in epoch 1 (gradual
    unfreezing under DDP: the stage that waits keeps requires_grad and loses its gradient until then),
    distilled from a teacher (each process loads it; it is in none of the student's checkpoints)."""
    teacher = tmp_path_factory.mktemp("teacher") / "run"
    assert run_tool("train", *DDP_DATA, "logger=none", f"hydra.run.dir={teacher}") == 0
    run_dir, states = tmp_path / "ddp", tmp_path / "ddp" / "rank_states"
    gradual = ["freeze=gradual", "freeze.milestones=[1]", "freeze.bn=eval", "trainer.max_epochs=2"]
    distill = [f"distill.teacher={teacher / 'checkpoints' / 'best.ckpt'}"]
    # the installed command, from a folder without conf/: Lightning re-runs `python -m transferlab.tools.train`
    run_cli(
        "-m", "transferlab", "train", *DDP_DATA, *gradual, *distill, *rank_states(states), "trainer=ddp",
        "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    for log in ("train.log", "train_ddp_process_1.log"):
        assert "Distilling from" in (run_dir / log).read_text(), log
    reported = json.loads((run_dir / "metrics.json").read_text())
    single = evaluate_in_one_process(run_dir / "checkpoints" / "best.ckpt")
    for key in SCALARS:
        assert reported[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    assert sum(map(sum, reported["test/confusion_matrix"])) == single["test_count"] == 109
    # the DDP child joined rank 0's directory: nothing else was created beside it
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    writers = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # event files of one process id: rank 0's

    state = {
        (r, name): torch.load(states / f"rank{r}_{name}.pt")
        for r in (0, 1)
        for name in ("start", "epoch0", "epoch1")
    }
    start = state[0, "start"]
    assert all(torch.equal(start[k], state[0, "epoch0"][k]) for k in start)  # frozen during epoch 0
    assert any(
        not torch.equal(start[k], state[0, "epoch1"][k]) for k in start if "weight" in k
    )  # trained after
    # the processes saw different batches: equal weights mean the unfrozen gradients were all-reduced
    assert all(torch.equal(state[0, "epoch1"][k], state[1, "epoch1"][k]) for k in start)


def test_lightning_started_processes_are_refused_in_a_sweep(monkeypatch):
    for name in ("SLURM_NTASKS", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    ddp = OmegaConf.create({"strategy": "ddp", "devices": 2, "num_nodes": 1, "accelerator": "cpu"})
    with pytest.raises(ConfigError, match="hydra/launcher=slurm"):
        check_multirun_processes(ddp, multirun=True)
    check_multirun_processes(ddp, multirun=False)  # a single run: Lightning starts its processes
    check_multirun_processes(OmegaConf.merge(ddp, {"devices": 1}), multirun=True)
    # under SLURM, srun started every process: a sweep job may use them
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    check_multirun_processes(ddp, multirun=True)


def test_sweeps_on_this_machine_refuse_lightning_started_processes(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    check_sweep_launch(compose_config(["trainer.devices=1"], with_hydra=True))
    for launcher in ("basic", "submitit_local"):
        ddp = compose_config(
            [f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=2"], with_hydra=True
        )
        with pytest.raises(ConfigError, match="starts 2 processes by re-running the command"):
            check_sweep_launch(ddp)


def test_a_sweep_with_ddp_processes_is_refused_before_its_first_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    status = run_tool(
        "train",
        "-m",
        *SWEEP,
        "trainer=ddp",
        "trainer.devices=2",
        "optim.lr=0.01,0.02",
        f"hydra.sweep.dir={sweep}",
    )
    assert status != 0
    err = capsys.readouterr().err
    assert "hydra/launcher=slurm" in err and "without -m" in err
    assert not sweep.exists()  # refused before any job (Hydra makes the directory for the first one)


def test_slurm_tasks_per_node_and_nodes_must_match_the_trainer():
    check_submitit_resources(
        compose_config(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"], with_hydra=True)
    )
    mismatch = compose_config(
        ["hydra/launcher=slurm", "trainer.devices=2", "hydra.launcher.tasks_per_node=1"], with_hydra=True
    )
    with pytest.raises(ConfigError, match=r"hydra.launcher.tasks_per_node=1 but trainer.devices=2"):
        check_submitit_resources(mismatch)
    nodes = compose_config(
        ["hydra/launcher=slurm", "trainer.num_nodes=2", "hydra.launcher.nodes=1"], with_hydra=True
    )
    with pytest.raises(ConfigError, match=r"hydra.launcher.nodes=1 but trainer.num_nodes=2"):
        check_submitit_resources(nodes)
    auto = compose_config(
        ["hydra/launcher=slurm", "trainer=ddp"], with_hydra=True
    )  # devices=auto: no number of tasks
    with pytest.raises(ConfigError, match=r"trainer.devices=auto with hydra/launcher=slurm"):
        check_sweep_launch(auto)


def test_slurm_launcher_writes_lightnings_requeue_signal_into_sbatch(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    launcher = compose_config(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], with_hydra=True
    )
    params = OmegaConf.to_container(launcher.hydra.launcher, resolve=True)
    sbatch = _make_sbatch_string(
        command="python -m submitit.core._submit",
        folder=str(tmp_path),
        ntasks_per_node=params["tasks_per_node"],
        nodes=params["nodes"],
        gpus_per_node=params["gpus_per_node"],
        signal_delay_s=params["signal_delay_s"],
        additional_parameters=params["additional_parameters"],
    )
    assert "#SBATCH --signal=USR1@120" in sbatch and "USR2" not in sbatch
    assert "#SBATCH --ntasks-per-node=4" in sbatch and "#SBATCH --nodes=2" in sbatch
    assert "#SBATCH --requeue" in sbatch


def test_slurm_resources_that_differ_from_the_trainer_are_refused_before_submitting():
    from hydra.utils import instantiate

    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=2",
        "hydra.launcher.tasks_per_node=1",
    ]
    config = compose_config(overrides, with_hydra=True)
    checks = instantiate(config.hydra.callbacks.launch_checks)  # as Hydra builds it for -m
    # a SystemExit stops the sweep before its first job (the CLI test above shows it for DDP)
    with pytest.raises(SystemExit, match="hydra.launcher.tasks_per_node=1 but trainer.devices=2"):
        checks.on_multirun_start(config=config)
