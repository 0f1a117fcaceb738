"""Resume: atomic checkpoints, `resume=<run dir>`, runs killed mid-epoch, SLURM requeues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.callbacks import pause_at
from tests.conftest import FAST, ROOT, compose_config, run_tool
from transferlab.errors import ConfigError
from transferlab.files import AtomicCheckpointIO, BackgroundCheckpointIO
from transferlab.resume import requeued_checkpoint, resume_config, start_checkpoint
from transferlab.runtime import slurm_run_name


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_background_saves_are_snapshots_and_the_preemption_checkpoint_is_written_at_once(
    tmp_path, monkeypatch
):
    io = BackgroundCheckpointIO()
    weights = torch.ones(3)
    io.save_checkpoint({"w": weights}, tmp_path / "last.ckpt")
    weights.zero_()  # the optimizer moves on while the thread writes: the file holds the weights at the save
    io.save_checkpoint({"w": weights}, tmp_path / "hpc_ckpt_1.ckpt")
    # the preemption checkpoint, and every save queued before it, are on disk when the call returns
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt")["w"].sum() == 0
    assert torch.load(tmp_path / "last.ckpt")["w"].sum() == 3
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    # a failed background write is raised by the next save, or when fit ends (whichever the thread's
    # timing makes first)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"w": weights}, tmp_path / "last.ckpt")
        io.teardown()
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.ckpt")["w"].sum() == 3 and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("trainer", [[], ["trainer=ddp", "trainer.devices=2"]], ids=["default", "ddp"])
def test_trainers_built_from_the_configs_save_checkpoints_atomically(tmp_path, trainer):
    from hydra.utils import instantiate

    cfg = compose_config([*FAST, *trainer], tmp_path)
    built = instantiate(cfg.trainer, logger=False)
    io = built.strategy.checkpoint_io  # written off the training loop, by a thread, atomically
    assert isinstance(io, BackgroundCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)


def test_last_ckpt_is_the_last_epoch_even_when_the_metric_did_not_improve(fast_cfg, tmp_path):
    from transferlab.training import train

    # a frozen backbone and a vanishing learning rate: val/acc stays what it was after epoch 0
    train(fast_cfg("trainer.max_epochs=2", "freeze=linear_probe", "optim.lr=1e-12", output_dir=tmp_path))
    epoch = {
        name: torch.load(tmp_path / "checkpoints" / f"{name}.ckpt")["epoch"] for name in ("best", "last")
    }
    assert epoch == {"best": 0, "last": 1}


def test_slurm_run_directory_is_the_job_id(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert slurm_run_name() == "slurm-4242"
    run_dir = compose_config([], with_hydra=True).hydra.run.dir
    assert run_dir.endswith("/runs/slurm-4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an interactive shell: fresh directories
    assert slurm_run_name() is None


def _fake_run(run_dir: Path, steps: dict[str, int]) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(["trainer.max_epochs=3"], run_dir), run_dir / ".hydra" / "config.yaml")
    for name, step in steps.items():
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step}, path)
    return run_dir


def test_requeued_job_continues_from_its_most_advanced_checkpoint(tmp_path, monkeypatch):
    run_dir = _fake_run(tmp_path / "run", {"checkpoints/last.ckpt": 30, "hpc_ckpt_1.ckpt": 10})
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_checkpoint(run_dir) is None  # first start of the job: never picks up old files
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(run_dir).name == "last.ckpt"  # a stale hpc checkpoint loses
    torch.save({"global_step": 35}, run_dir / "hpc_ckpt_2.ckpt")
    assert requeued_checkpoint(run_dir).name == "hpc_ckpt_2.ckpt"  # saved at the requeue signal
    torch.save({"global_step": 30}, run_dir / "hpc_ckpt_2.ckpt")
    assert requeued_checkpoint(run_dir).name == "last.ckpt"  # a tie: the end of an epoch resumes exactly
    # a job started from another run's checkpoint continues from its own progress once requeued
    assert start_checkpoint("/elsewhere/best.ckpt", run_dir) == str(run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert start_checkpoint("/elsewhere/best.ckpt", run_dir) == "/elsewhere/best.ckpt"


def test_resume_takes_the_saved_config_and_only_extends_epochs(tmp_path):
    run_dir = _fake_run(tmp_path / "run", {"checkpoints/last.ckpt": 3})
    typed = compose_config([f"resume={run_dir}", "trainer.max_epochs=5", "optim.lr=0.5"], run_dir)
    cfg = resume_config(typed, [f"resume={run_dir}", "trainer.max_epochs=5"])
    assert cfg.trainer.max_epochs == 5  # the saved run had 3
    assert cfg.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
    assert cfg.paths.output_dir == str(run_dir) and cfg.optim.lr != 0.5
    with pytest.raises(ConfigError, match=r"optim.lr=0.5 cannot be changed .* ckpt_path="):
        resume_config(typed, [f"resume={run_dir}", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"not a run directory \(no .hydra/config.yaml\)"):
        resume_config(compose_config([f"resume={tmp_path}"], tmp_path), [])
    with pytest.raises(ConfigError, match=r"resume=.*/gone: no such directory"):
        resume_config(compose_config([f"resume={tmp_path / 'gone'}"], tmp_path), [])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="no checkpoints/last.ckpt"):
        resume_config(compose_config([f"resume={tmp_path}"], tmp_path), [])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.02)


def _start_cli(*overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# two epochs of 4 batches; the head trains alone in epoch 0, the backbone joins in epoch 1
RESUME_RUN = [
    *(o for o in FAST if not o.startswith("trainer.limit_")),
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "freeze=gradual",
    "freeze.milestones=[1]",
    "trainer.num_sanity_val_steps=0",
    "logger=none",
]


def _final(metrics_file: Path) -> dict[str, float]:
    metrics = json.loads(metrics_file.read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "test/")) or k == "epochs_trained"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, float]:
    from transferlab.training import train

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config(RESUME_RUN, run_dir))
    return _final(run_dir / "metrics.json")


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict[str, dict]:
    """Three runs interrupted two batches into epoch 1, started together (their start-ups overlap): by
    SIGTERM, by SIGKILL, and by SLURM's SIGUSR1 before a time limit. For the SLURM run, a fake `scontrol`
    records the requeue call, then ends the job as SLURM would; Lightning owns SIGUSR1 (it saves
    hpc_ckpt_1.ckpt and calls `scontrol requeue <job id>`)."""
    root = tmp_path_factory.mktemp("interrupted")
    bin_dir, calls = root / "bin", root / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    slurm_env = {**SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    runs = {
        "SIGTERM": {"dir": root / "killed_term", "signal": signal.SIGTERM, "env": None},
        "SIGKILL": {"dir": root / "killed_kill", "signal": signal.SIGKILL, "env": None},
        "SIGUSR1": {
            "dir": root / "outputs" / "runs" / "slurm-4242",
            "signal": signal.SIGUSR1,
            "env": slurm_env,
        },
    }
    for name, run in runs.items():
        run["marker"] = root / f"{name}_in_epoch_1"
        where = [f"paths.output_root={root / 'outputs'}"] if run["env"] else [f"hydra.run.dir={run['dir']}"]
        run["command"] = [*RESUME_RUN, *where, *pause_at(run["marker"], epoch=1, batch=1)]
        run["proc"] = _start_cli(*run["command"], env=run["env"])
    for run in runs.values():
        _wait_for(run["marker"], run["proc"])  # two of epoch 1's four batches are done
        run["proc"].send_signal(run["signal"])
        run["log"] = run["proc"].communicate(timeout=120)[0]
    runs["SIGUSR1"]["scontrol_calls"] = calls
    return runs


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_run_killed_mid_epoch_and_resumed_reaches_the_uninterrupted_metrics(
    interrupted, uninterrupted, sig, capsys
):
    killed = interrupted[sig]["dir"]
    assert interrupted[sig]["proc"].returncode != 0, interrupted[sig]["log"][-2000:]
    assert not (killed / "metrics.json").exists()
    capsys.readouterr()
    assert run_tool("train", f"resume={killed}") == 0  # from last.ckpt, the end of epoch 0
    assert _final(killed / "metrics.json") == uninterrupted
    summaries = [line for line in capsys.readouterr().out.splitlines() if "transferlab.callbacks" in line]
    assert len(summaries) == 1 and "epoch 2/2" in summaries[0] and "val/acc=" in summaries[0]


def test_slurm_requeue_continues_in_the_same_directory(interrupted, monkeypatch, capsys):
    """The requeued job (same SLURM_JOB_ID, SLURM_RESTART_COUNT=1) finds its directory and continues."""
    job = interrupted["SIGUSR1"]
    run_dir = job["dir"]
    assert job["scontrol_calls"].read_text().split() == ["requeue", "4242"], job["log"][-3000:]
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file() and not (run_dir / "metrics.json").exists()
    for name, value in {
        **job["env"],
        "SLURM_RESTART_COUNT": "1",
    }.items():  # the requeued job, in this process
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert run_tool("train", *job["command"]) == 0
    # hpc_ckpt_1 (two batches into epoch 1) is further on than last.ckpt (end of epoch 0)
    assert f"continuing from {run_dir / 'hpc_ckpt_1.ckpt'}" in capsys.readouterr().out
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_trained"] == 2
    assert [p.name for p in run_dir.parent.iterdir()] == ["slurm-4242"]


def test_a_run_saved_before_classes_moved_still_resumes(tmp_path):
    run_dir = _fake_run(tmp_path / "run", {"checkpoints/last.ckpt": 3})
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    saved.trainer.plugins[0]._target_ = "transferlab.checkpoint_io.AtomicCheckpointIO"  # where it was
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    cfg = resume_config(compose_config([f"resume={run_dir}"], run_dir), [f"resume={run_dir}"])
    assert cfg.trainer.plugins[0]._target_ == "transferlab.files.AtomicCheckpointIO"
