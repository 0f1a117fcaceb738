"""Issue 15, weight averaging: does an EMA of the weights (`ema.enabled=true`: decay 0.999 with the
warm-up min(decay, (1 + n) / (10 + n))) help a short fine-tune? With and without it, 3 seeds, on
- digits: ResNet-18 pretrained on digits 0-4 (experiment=digits_pretrain, made on first use), fine-tuned
  on digits 5-9 with 10 labelled images per class, 32 px;
- imagenet: EfficientNet-Lite0 with its packaged ImageNet weights, all 10 digits, 10 images per class, 32 px.
Everything else is the defaults (10 epochs of at least 20 batches, SGD, cosine schedule).

Runs `transferlab train` in this process, one run at a time, and appends one JSON line per run to
results.jsonl (a run already there is skipped, so the study resumes); `--table` prints the table only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transferlab.tools.app import run_in_process

HERE = Path(__file__).resolve().parent
COMMON = [
    "data=digits",
    "data.shots=10",
    "data.image_size=32",
    "callbacks.progress.mode=none",
    "logger=none",
    "hydra/job_logging=file_only",
]
TASKS = {
    "digits": ["backbone=resnet18", "backbone.weights={source}", "data.classes=[5,6,7,8,9]"],
    "imagenet": ["backbone=efficientnet_lite0"],
}
SETTINGS = {"no_ema": [], "ema": ["ema.enabled=true"]}


def source_checkpoint(out: Path) -> str:
    """ResNet-18 trained on digits 0-4 (as experiments/imagenet_transfer/study.py makes it)."""
    run_dir = out / "runs" / "digits_source"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file() or not Path(json.loads(metrics.read_text())["best_ckpt"]).is_file():
        overrides = [
            "experiment=digits_pretrain",
            "data=digits",
            "callbacks.progress.mode=none",
            "logger=none",
            "hydra/job_logging=file_only",
            f"hydra.run.dir={run_dir}",
        ]
        if run_in_process("train", overrides) != 0:
            raise SystemExit(f"the source run failed: {run_dir}")
    return json.loads(metrics.read_text())["best_ckpt"]


def run_one(out: Path, task: str, setting: str, seed: int) -> dict:
    run_dir = out / "runs" / f"{task}_{setting}_{seed}"
    task_overrides = [o.format(source=source_checkpoint(out)) if "{source}" in o else o for o in TASKS[task]]
    overrides = [*COMMON, *task_overrides, *SETTINGS[setting], f"seed={seed}", f"hydra.run.dir={run_dir}"]
    started = time.monotonic()
    status = run_in_process("train", overrides)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if status == 0 else {}
    return {
        "task": task,
        "setting": setting,
        "seed": seed,
        "status": status,
        "test/acc": metrics.get("test/acc"),
        "val/acc": metrics.get("val/acc"),
        "seconds": round(time.monotonic() - started, 1),
        "overrides": overrides,
    }


def table(results: list[dict]) -> str:
    """test/acc: mean ± std over seeds, and each seed's, per task and setting."""
    seeds = sorted({r["seed"] for r in results})
    rows = [
        "| task | setting | test/acc mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " | s/run |",
        "|---|---|---|" + "---|" * len(seeds) + "---|",
    ]
    for task in TASKS:
        for setting in SETTINGS:
            runs = [r for r in results if (r["task"], r["setting"]) == (task, setting)]
            accs = [r["test/acc"] for r in runs if r["test/acc"] is not None]
            if not accs:
                continue
            spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            per_seed = {r["seed"]: r["test/acc"] for r in runs}
            cells = [f"{per_seed[s]:.3f}" if per_seed.get(s) is not None else "" for s in seeds]
            seconds = statistics.mean(r["seconds"] for r in runs)
            rows.append(
                f"| {task} | {setting} | {statistics.mean(accs):.3f}{spread} | "
                + " | ".join(cells)
                + f" | {seconds:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--table", action="store_true", help="print the table of results.jsonl and stop")
    args = parser.parse_args()
    results_file = args.out / "results.jsonl"
    done = (
        [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    )
    if not args.table:
        for task in args.tasks:
            for seed in args.seeds:
                for setting in args.settings:
                    if any((r["task"], r["setting"], r["seed"]) == (task, setting, seed) for r in done):
                        continue
                    result = run_one(args.out, task, setting, seed)
                    done.append(result)
                    with open(results_file, "a") as f:
                        f.write(json.dumps(result) + "\n")
                    print(
                        json.dumps(
                            {k: result[k] for k in ("task", "setting", "seed", "test/acc", "seconds")}
                        ),
                        flush=True,
                    )
    print(table(done))


if __name__ == "__main__":
    main()
