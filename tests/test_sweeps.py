"""Sweeps through train.py -m: a grid, Optuna, the submitit local launcher, and the summary tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, run_tool
from transferlab.sweep.summary import write_summary

# sweeps whose metrics do not matter, only that every job ran: one batch per stage
SWEEP = [o for o in FAST if not o.startswith("trainer.limit_")]
SWEEP += ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
SWEEP += ["trainer.num_sanity_val_steps=0", "logger=none"]  # and runs without a logger work


def _table(markdown: str) -> list[list[str]]:
    """The cells of the summary's table rows, header and rule left out."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]


def test_grid_sweep_2x2_and_its_summary(tmp_path):
    sweep = tmp_path / "grid"
    assert (
        run_tool("train", "-m", *SWEEP, "optim=sgd,adamw", "optim.lr=0.001,0.01", f"hydra.sweep.dir={sweep}")
        == 0
    )
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    markdown = write_summary(sweep)
    rows = _table(markdown)
    assert sorted(row[2] for row in rows) == sorted(
        f"optim={o} optim.lr={lr}" for o in ("sgd", "adamw") for lr in ("0.001", "0.01")
    )  # the swept values; what every job had is in the heading
    assert all(row[1] == "ok" for row in rows) and "4 jobs (4 ok, 0 failed, 0 unfinished)" in markdown
    accs = [float(row[3]) for row in rows]
    assert accs == sorted(accs, reverse=True)  # best val/acc first
    assert (sweep / "summary.csv").read_text().count("\n") == 5 and (sweep / "summary.md").is_file()


def test_optuna_sweep_of_three_trials_optimises_the_val_metric(tmp_path):
    import optuna

    sweep = tmp_path / "optuna"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    status = run_tool(
        "train", "-m", *SWEEP, "hparams_search=optuna", "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert status == 0
    accs = [json.loads(p.read_text())["val/acc"] for p in sweep.glob("*/metrics.json")]
    assert len(accs) == 3
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(accs))  # train.py returned val/acc; maximised
    assert set(result["best_params"]) == {"optim.lr", "optim.weight_decay"}
    study = optuna.load_study(study_name="train", storage=storage)  # kept for a later sweep to go on
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(accs))


def test_submitit_local_launcher_runs_jobs_and_a_failing_job_is_reported(tmp_path, capsys):
    status = run_tool(  # the launcher in this process, each job in its own (submitit)
        "train",
        "-m",
        *SWEEP,
        "hydra/launcher=submitit_local",
        "optim.lr=0.01,-1",
        f"paths.output_root={tmp_path}",
    )
    assert status != 0  # Hydra raises the failed job's error once the sweep is done
    # the job processes resolved the launcher's sweep directory (its time and run id), not new ones
    [sweep] = (tmp_path / "multirun").iterdir()
    assert (sweep / "0" / "metrics.json").is_file()  # the other job ran to the end
    assert "optim.lr" in (sweep / "1" / "error.txt").read_text()
    assert list((sweep / ".submitit").iterdir())  # run through submitit, in the same sweep directory
    assert run_tool("summary", f"sweep_dir={sweep}") == 0
    rows = _table(capsys.readouterr().out)
    assert [row[:3] for row in rows] == [["0", "ok", "optim.lr=0.01"], ["1", "failed", "optim.lr=-1"]]
    assert "must be a positive number" in rows[1][-1]  # the failed job's error, last line


def _job(sweep: Path, name: str, overrides: list[str], metrics: dict | None = None, error: str = "") -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    (job / ".hydra" / "config.yaml").write_text("optimized_metric: val/loss\noptimized_mode: min\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error:
        (job / "error.txt").write_text(f"Traceback ...\n{error}\n")


def test_summary_sorts_by_the_sweeps_metric_and_lists_failed_and_unfinished_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    common = ["data=digits", "trainer.max_epochs=3"]
    _job(sweep, "0", [*common, "optim.lr=0.1"], {"val/loss": 0.9, "val/acc": 0.5, "epochs_trained": 3})
    _job(sweep, "1", [*common, "optim.lr=0.01"], {"val/loss": 0.3, "val/acc": 0.8, "epochs_trained": 3})
    _job(sweep, "2", [*common, "optim.lr=-1"], error="ConfigError: optim.lr=-1 must be > 0")
    _job(sweep, "10", [*common, "optim.lr=0.001"])
    assert run_tool("summary", f"sweep_dir={sweep}", f"out={tmp_path / 'out'}") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("4 jobs (2 ok, 1 failed, 1 unfinished), best val/loss (min) first.\n")
    assert "Every job had: data=digits trainer.max_epochs=3\n" in printed
    rows = [
        [c.strip() for c in line.split("|")[1:-1]] for line in printed.splitlines() if line.startswith("|")
    ]
    assert rows[0][:4] == ["job", "status", "overrides", "val/loss"]
    assert [row[:4] for row in rows[2:]] == [
        ["1", "ok", "optim.lr=0.01", "0.3000"],  # lowest val/loss first: optimized_mode=min
        ["0", "ok", "optim.lr=0.1", "0.9000"],
        ["2", "failed", "optim.lr=-1", ""],
        ["10", "unfinished", "optim.lr=0.001", ""],
    ]
    assert rows[4][-1] == "ConfigError: optim.lr=-1 must be > 0"  # the error's last line
    csv_lines = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("job,status,overrides,val/loss") and len(csv_lines) == 5
    assert (tmp_path / "out" / "summary.md").read_text() == printed
    run_tool("summary", f"sweep_dir={sweep}", "metric=val/acc", f"out={tmp_path / 'by_acc'}")
    by_acc = [
        line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
    ]
    assert by_acc[1:3] == ["1", "0"]  # another metric: max unless it is a loss


def test_summary_of_a_single_run_says_it_is_one(tmp_path):
    (tmp_path / ".hydra").mkdir()
    with pytest.raises(
        SystemExit, match=r"holds no job directories .*\(it is a single run: its metrics.json"
    ):
        write_summary(tmp_path)


def test_summary_of_a_folder_that_is_no_sweep_keeps_the_users_summary_files(tmp_path):
    """Without Hydra's multirun.yaml the folder is not a sweep: summary.md there may be the user's own."""
    folder = tmp_path / "runs"
    _job(folder, "a", ["optim.lr=0.1"], {"val/loss": 0.9, "val/acc": 0.5, "epochs_trained": 3})
    (folder / "summary.md").write_text("my notes")
    with pytest.raises(SystemExit, match=r"already holds summary.md; it is left untouched"):
        write_summary(folder)
    assert (folder / "summary.md").read_text() == "my notes"
    (folder / "multirun.yaml").write_text("hydra: {}\n")  # a sweep's folder: its summary is rewritten
    write_summary(folder)
    assert (folder / "summary.md").read_text() != "my notes"
