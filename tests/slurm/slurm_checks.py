"""Against a real SLURM scheduler (`make test-slurm`, after scripts/slurm_cluster.sh has started a
single-node cluster on this machine): sweeps through `hydra/launcher=slurm`, a requeued job, DDP over
SLURM tasks, a failing job, and the preemption signal (USR1) path.

Not collected by `make test`: the file name does not match pytest's `test_*.py`, so only an explicit
`pytest tests/slurm/slurm_checks.py` runs it. Every job is a tiny CPU run (the FAST overrides).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.callbacks import pause_at
from tests.conftest import FAST, ROOT, run_tool
from tests.test_distributed import DDP_DATA, SCALARS, evaluate_in_one_process

PARTITION = os.environ.get("SLURM_TEST_PARTITION", "debug")
# one CPU per task, no GPU, a short time limit: what this single-node test cluster has
SLURM = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=15",
    "trainer.accelerator=cpu",
    "data=digits",
    "data.num_workers=0",  # a resumed run sees exactly the data of an uninterrupted one
]
SWEEP_TIMEOUT = 420  # seconds for one sweep, submission to the last job's end


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """The scheduler answers and the partition has an idle (or busy) node; fails (not skips) otherwise:
    this file is only run to test against a cluster."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        pytest.fail("no SLURM commands here: run scripts/slurm_cluster.sh first (make test-slurm does)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    state = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True)
    if "UP" not in ping.stdout or not re.search(r"idle|mixed|alloc", state.stdout):
        pytest.fail(f"SLURM is not ready: {ping.stdout}{ping.stderr} partition {PARTITION}: {state.stdout}")


def _env() -> dict[str, str]:
    # sbatch exports this environment to the jobs: tests.callbacks stays importable there
    return {
        **os.environ,
        "TRANSFERLAB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


def start_sweep(output_root: Path, *overrides: str) -> subprocess.Popen:
    """`train.py -m` with the SLURM launcher, in the background; its output in output_root/launcher.log."""
    output_root.mkdir(parents=True, exist_ok=True)
    log = open(output_root / "launcher.log", "w")  # noqa: SIM115 (closed with the process)
    command = [sys.executable, "train.py", "-m", *SLURM, *overrides, f"paths.output_root={output_root}"]
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, output_root: Path) -> None:
    """End a sweep that a failed check left running, and its SLURM jobs."""
    ids = [p.name for p in output_root.glob("multirun/*/.submitit/*") if p.is_dir()]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, output_root: Path, timeout: float = SWEEP_TIMEOUT) -> tuple[int, str]:
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"sweep still running after {timeout} s:\n{_tail(output_root)}") from None
    return status, (output_root / "launcher.log").read_text()


def _tail(output_root: Path) -> str:
    text = (output_root / "launcher.log").read_text()[-3000:]
    for log in sorted(output_root.glob("multirun/*/.submitit/*/*_log.*")):
        text += f"\n--- {log.name}\n{log.read_text()[-2000:]}"
    return text


def the_sweep_dir(output_root: Path) -> Path:
    """The one directory the sweep made under multirun/ (the one Hydra named: <time>_<id>)."""
    found = sorted((output_root / "multirun").iterdir())
    assert len(found) == 1, f"the sweep made {[p.name for p in found]}, not one directory"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", found[0].name), found[0].name
    return found[0]


def job_logs(sweep: Path, job_id: str) -> str:
    """What the SLURM job wrote (submitit's logs, appended to across requeues) and its run's train.log."""
    return "".join(p.read_text() for p in sorted((sweep / ".submitit").glob(f"{job_id}/*_log.*")))


def submitted_job_ids(sweep: Path) -> list[str]:
    """SLURM ids of the sweep's jobs, in job-number order (submitit's folders: <id> or <array>_<task>)."""
    ids = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    if any("_" in i for i in ids):  # an array job: <array id>/ holds submitit's files, not a job's
        ids = [i for i in ids if "_" in i]
    return sorted(ids, key=lambda i: [int(x) for x in i.split("_")])


def show_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def summary_table(capsys, sweep: Path) -> list[list[str]]:
    capsys.readouterr()
    assert run_tool("summary", f"sweep_dir={sweep}") == 0
    printed = capsys.readouterr().out
    return [
        [c.strip() for c in line.split("|")[1:-1]] for line in printed.splitlines() if line.startswith("|")
    ][2:]


def wait_for(path: Path, proc: subprocess.Popen, output_root: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared:\n{_tail(output_root)}")
        time.sleep(0.2)


# -- 1 and 4: a sweep lands in its directory; a failed job is reported with its error --------------


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> tuple[int, str, Path, Path]:
    """Three jobs, the third one failing (optim.lr=-1): status, launcher output, output root, sweep dir."""
    root = tmp_path_factory.mktemp("grid")
    proc = start_sweep(root, *FAST, "optim.lr=0.01,0.02,-1")
    try:
        status, out = finish(proc, root)
    finally:
        stop(proc, root)
    return status, out, root, the_sweep_dir(root)


def test_sweep_jobs_land_in_the_sweep_directory_hydra_named(grid_sweep, capsys):
    _, out, root, sweep = grid_sweep
    assert f"sweep output dir : {sweep}" in out  # the directory the launcher announced
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file(), _tail(root)
        assert (sweep / job / "checkpoints" / "best.ckpt").is_file()
    assert not list(root.glob("multirun/slurm-*")) and not (root / "runs").exists()
    rows = summary_table(capsys, sweep)
    assert sorted(row[:3] for row in rows if row[1] == "ok") == [
        ["0", "ok", "optim.lr=0.01"],
        ["1", "ok", "optim.lr=0.02"],
    ]


def test_a_failed_slurm_job_is_reported_by_the_summary_with_its_error(grid_sweep, capsys):
    status, _, _, sweep = grid_sweep
    assert status != 0  # Hydra raises the failed job's error once the sweep is done
    assert "optim.lr" in (sweep / "2" / "error.txt").read_text()
    rows = summary_table(capsys, sweep)
    assert rows[-1][:3] == ["2", "failed", "optim.lr=-1"]
    assert "must be a positive number" in rows[-1][-1]  # the failed job's error, last line


# -- 2 and 5: a requeued job, and the preemption signal ---------------------------------------------


@pytest.fixture(scope="module")
def requeued_sweep(tmp_path_factory) -> dict:
    """Three identical 3-epoch runs in one sweep, told apart by their pause marker only: job 0 runs
    uninterrupted (its marker exists: PauseAt never holds it), job 1 is requeued with `scontrol requeue`
    while held in epoch 1, job 2 gets SLURM's preemption signal (`scancel --signal=USR1`, what
    `--signal=USR1@<s>` sends before the time limit) there: Lightning saves hpc_ckpt_1.ckpt and requeues it."""
    root = tmp_path_factory.mktemp("requeue")
    markers = {name: root / "markers" / name for name in ("uninterrupted", "requeue", "usr1")}
    markers["uninterrupted"].parent.mkdir(parents=True)
    markers["uninterrupted"].touch()
    overrides = [o for o in FAST if not o.startswith("trainer.max_epochs")]
    pause = [o for o in pause_at(markers["requeue"], epoch=1, batch=1) if ".marker=" not in o]
    proc = start_sweep(
        root,
        *overrides,
        "trainer.max_epochs=3",
        *pause,
        f"+callbacks.pause.marker={','.join(str(m) for m in markers.values())}",
    )
    try:
        wait_for(markers["requeue"], proc, root)
        sweep = the_sweep_dir(root)
        ids = submitted_job_ids(sweep)
        assert len(ids) == 3, ids
        subprocess.run(["scontrol", "requeue", ids[1]], check=True)
        wait_for(markers["usr1"], proc, root)
        subprocess.run(["scancel", "--signal=USR1", ids[2]], check=True)
        status, out = finish(proc, root)
    finally:
        stop(proc, root)
    assert status == 0, _tail(root)
    return {"root": root, "sweep": sweep, "ids": ids, "out": out}


def _scalars(job_dir: Path) -> dict[str, float]:
    metrics = json.loads((job_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in SCALARS if key in metrics} | {"epochs": metrics["epochs_trained"]}


def test_a_requeued_job_continues_from_its_checkpoint_with_the_metrics_of_an_uninterrupted_run(
    requeued_sweep, capsys
):
    sweep, ids = requeued_sweep["sweep"], requeued_sweep["ids"]
    assert "Restarts=1" in show_job(ids[1]) and "Restarts=0" in show_job(ids[0])
    logs = job_logs(sweep, ids[1])
    assert f"continuing from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in logs, logs[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0",
        "1",
        "2",
        "multirun.yaml",
    ]  # the requeued job went on in its own directory
    reference, requeued = _scalars(sweep / "0"), _scalars(sweep / "1")
    assert reference["epochs"] == 3
    assert requeued == pytest.approx(reference, rel=1e-6, abs=1e-8)
    assert [row[1] for row in summary_table(capsys, sweep)] == ["ok", "ok", "ok"]


def test_the_preemption_signal_saves_hpc_ckpt_and_requeues_the_job(requeued_sweep):
    sweep, ids = requeued_sweep["sweep"], requeued_sweep["ids"]
    assert "Restarts=1" in show_job(ids[2])
    logs = job_logs(sweep, ids[2])
    assert "Handling auto-requeue signal" in logs, logs[-3000:]
    assert f"Requeued SLURM job: {ids[2]}" in logs, logs[-3000:]
    hpc = sweep / "2" / "hpc_ckpt_1.ckpt"
    assert hpc.is_file()
    assert f"continuing from {hpc}" in logs  # two batches into epoch 1: further on than last.ckpt
    # mid-epoch, and still the uninterrupted run's metrics (Lightning restores the epoch's progress)
    assert _scalars(sweep / "2") == pytest.approx(_scalars(sweep / "0"), rel=1e-6, abs=1e-8)
    # what SLURM sends before the time limit, as submitted (hydra/launcher=slurm's signal_delay_s)
    [script] = {p.read_text() for p in (sweep / ".submitit").rglob("*.sh")}
    assert "#SBATCH --signal=USR1@120\n" in script and "#SBATCH --requeue\n" in script


# -- 3: DDP over two SLURM tasks equals one process -------------------------------------------------


def test_ddp_over_two_slurm_tasks_reports_the_metrics_of_one_process(tmp_path):
    proc = start_sweep(tmp_path, *DDP_DATA, "trainer=ddp", "trainer.devices=2")
    try:
        status, _ = finish(proc, tmp_path)
    finally:
        stop(proc, tmp_path)
    assert status == 0, _tail(tmp_path)
    sweep = the_sweep_dir(tmp_path)
    [job_id] = submitted_job_ids(sweep)
    logs = job_logs(sweep, job_id)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs and "distributed_backend=gloo" in logs, logs[-3000:]
    assert "NumTasks=2" in show_job(job_id)
    run_dir = sweep / "0"
    reported = json.loads((run_dir / "metrics.json").read_text())
    single = evaluate_in_one_process(run_dir / "checkpoints" / "best.ckpt")
    for key in SCALARS:
        assert reported[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    assert sum(map(sum, reported["test/confusion_matrix"])) == single["test_count"] == 109
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    writers = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # event files of one process id: rank 0's
