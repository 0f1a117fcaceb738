"""The table of a sweep (`transferlab summary sweep_dir=outputs/multirun/<sweep>`).

One row per job directory (a folder with .hydra/): its overrides, its status (ok: metrics.json,
failed: error.txt, unfinished: neither, still running or killed), its final metrics. Sorted by the sweep's optimized metric,
best first; failed and unfinished jobs last. Writes summary.csv and summary.md, prints the Markdown.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transferlab.config.schema import TrainConfig, metric_direction
from transferlab.files import SWEEP_RECORD, atomic_write

METRIC_COLUMNS = ("val/acc", "val/f1", "val/loss", "test/acc", "test/f1", "test/loss")


@dataclass
class Job:
    name: str
    overrides: list[str]
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    optimized_metric: str | None = None


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _last_error_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def read_job(job_dir: Path) -> Job:
    config = _read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    metrics_file, error_file = job_dir / "metrics.json", job_dir / "error.txt"
    if metrics_file.is_file():
        status, metrics, error = "ok", json.loads(metrics_file.read_text()), ""
    elif error_file.is_file():
        status, metrics, error = "failed", {}, _last_error_line(error_file)
    else:
        status, metrics, error = "unfinished", {}, ""
    return Job(
        name=job_dir.name,
        overrides=[str(o) for o in overrides],
        status=status,
        metrics=metrics,
        error=error,
        optimized_metric=config.get("optimized_metric"),
    )


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Job directories are the sweep's subfolders with a .hydra/ folder (Hydra numbers them 0, 1, ...)."""
    dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()]
    dirs.sort(key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    return [read_job(d) for d in dirs]


def _score(job: Job, metric: str, maximize: bool) -> float:
    value = job.metrics.get(metric)
    if job.status != "ok" or not isinstance(value, int | float) or math.isnan(value):
        return math.inf
    return -value if maximize else value


def common_overrides(jobs: list[Job]) -> list[str]:
    """The overrides every job of the sweep has (what was typed besides the swept values)."""
    if len(jobs) < 2:
        return []
    shared = set.intersection(*(set(job.overrides) for job in jobs))
    return [o for o in jobs[0].overrides if o in shared]


def summary_rows(jobs: list[Job], metric: str, maximize: bool = True) -> list[dict[str, Any]]:
    """One dict per job, best first by `metric`; jobs without it (failed, unfinished) last. The overrides
    column shows what tells the jobs apart (common_overrides left out)."""
    columns = [metric, *[c for c in METRIC_COLUMNS if c != metric]]
    common = set(common_overrides(jobs))
    rows = []
    for job in sorted(jobs, key=lambda j: _score(j, metric, maximize)):
        swept = " ".join(o for o in job.overrides if o not in common)
        row: dict[str, Any] = {"job": job.name, "status": job.status, "overrides": swept}
        for column in columns:
            value = job.metrics.get(column)
            row[column] = f"{value:.4f}" if isinstance(value, int | float) else ""
        row["epochs"] = job.metrics.get("epochs_trained", "")
        row["error"] = job.error
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no jobs)\n"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(row[h]).replace("|", "\\|") for h in headers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(
    sweep_dir: Path, metric: str | None = None, out: Path | None = None, mode: str | None = None
) -> str:
    """Write summary.csv and summary.md into `out` (default: the sweep directory); return the Markdown."""
    if not sweep_dir.is_dir():
        raise SystemExit(f"Error: {sweep_dir}: no such sweep directory")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        single = (
            " (it is a single run: its metrics.json is its result)" if (sweep_dir / ".hydra").is_dir() else ""
        )
        raise SystemExit(f"Error: {sweep_dir} holds no job directories (folders with .hydra/){single}")
    first = next((j for j in jobs if j.optimized_metric), jobs[0])
    metric = metric or first.optimized_metric or TrainConfig.optimized_metric
    mode = mode or metric_direction(metric)  # training refuses an optimized_mode that contradicts it
    found = {key for job in jobs for key in job.metrics}
    if found and metric not in found:
        columns = sorted(key for key in found if "/" in key and "confusion" not in key)
        raise SystemExit(
            f"Error: metric={metric} is not a metric of these jobs; they have: {', '.join(columns)}"
        )
    rows = summary_rows(jobs, metric, maximize=mode == "max")
    into_sweep = out is None or out.resolve() == sweep_dir.resolve()
    # a sweep's folder takes a new summary over its old one; any other folder's summary files may be the
    # user's own
    out = _output_folder(out or sweep_dir, own=into_sweep and (sweep_dir / SWEEP_RECORD).is_file())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    markdown = _heading(jobs, metric, mode) + "\n" + to_markdown(rows)
    for name, text in (("summary.csv", buffer.getvalue()), ("summary.md", markdown)):
        atomic_write(out / name, lambda f, text=text: f.write(text.encode()))
    return markdown


def _output_folder(out: Path, own: bool) -> Path:
    """The sweep's own folder takes a new summary over the old one; another folder (out=, or a sweep_dir
    that is no sweep) must not hold summary files already: they may be the user's."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"Error: out={out} is a file; give a folder for summary.csv and summary.md")
    taken = [name for name in ("summary.csv", "summary.md") if (out / name).exists()]
    if taken and not own:
        raise SystemExit(
            f"Error: out={out} already holds {', '.join(taken)}; it is left untouched. Choose another out="
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _heading(jobs: list[Job], metric: str, mode: str) -> str:
    counts = {status: sum(job.status == status for job in jobs) for status in ("ok", "failed", "unfinished")}
    lines = [
        f"{len(jobs)} jobs ({', '.join(f'{n} {status}' for status, n in counts.items())}), "
        f"best {metric} ({mode}) first."
    ]
    if common := common_overrides(jobs):
        lines.append(f"Every job had: {' '.join(common)}")
    return "".join(line + "\n" for line in lines)
