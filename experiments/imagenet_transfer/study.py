"""The defaults study of issue 13: which recipe transfers best from real pretrained weights, at few and
many labels, and do the defaults land near it?

Runs `transferlab train` in this process for each (backbone, labels per class, recipe, seed) and
appends one JSON line per run to results.jsonl (a run already there is skipped, so the study resumes).
`python experiments/imagenet_transfer/study.py --help` lists the grid's options; `--table` prints the
mean ± std table of what results.jsonl holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transferlab.tools.app import run_in_process

HERE = Path(__file__).resolve().parent
BACKBONES = {"lite0": ["backbone=efficientnet_lite0"]}
RECIPES = {
    "defaults": [],
    "lp_ft": ["experiment=finetune_small_data"],
    "linear_probe": ["freeze=linear_probe", "augment=none", "optim.lr=0.1"],
    "scratch": ["backbone.weights=null"],
    # candidates for new defaults: the backbone at a tenth of the head's LR, and more optimizer steps
    "backbone_lr_0.1": ["optim.backbone_lr_mult=0.1"],
    "backbone_lr_0.1_batch16": ["optim.backbone_lr_mult=0.1", "data.batch_size=16"],
}
COMMON = ["data=digits", "callbacks.progress.mode=none", "logger=none", "test_after_fit=true"]


def run_one(out: Path, backbone: str, shots: int | None, recipe: str, seed: int, image_size: int) -> dict:
    run_dir = out / "runs" / f"{backbone}_{shots or 'all'}_{recipe}_{seed}"
    overrides = [
        *COMMON,
        *BACKBONES[backbone],
        *RECIPES[recipe],
        f"seed={seed}",
        f"data.image_size={image_size}",
        f"data.shots={shots if shots else 'null'}",
        f"hydra.run.dir={run_dir}",
        "hydra/job_logging=file_only",
    ]
    started = time.monotonic()
    status = run_in_process("train", overrides)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if status == 0 else {}
    return {
        "backbone": backbone,
        "shots": shots,
        "recipe": recipe,
        "seed": seed,
        "image_size": image_size,
        "status": status,
        "test/acc": metrics.get("test/acc"),
        "val/acc": metrics.get("val/acc"),
        "seconds": round(time.monotonic() - started, 1),
        "overrides": overrides,
    }


def table(results: list[dict]) -> str:
    rows = [
        "| backbone | labels/class | recipe | test/acc mean ± std | seeds | s/run |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["backbone"], r["shots"] or 10**9, r["recipe"]) for r in results})
    for backbone, shots, recipe in keys:
        runs = [
            r
            for r in results
            if (r["backbone"], r["shots"] or 10**9, r["recipe"]) == (backbone, shots, recipe)
        ]
        accs = [r["test/acc"] for r in runs if r["test/acc"] is not None]
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        mean = f"{statistics.mean(accs):.3f}{spread}" if accs else "failed"
        seconds = statistics.mean(r["seconds"] for r in runs)
        label = "all" if shots == 10**9 else shots
        rows.append(f"| {backbone} | {label} | {recipe} | {mean} | {len(accs)} | {seconds:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--shots", nargs="+", default=["2", "5", "10", "all"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--table", action="store_true", help="print the table of results.jsonl and stop")
    args = parser.parse_args()
    results_file = args.out / "results.jsonl"
    done = (
        [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    )
    if not args.table:
        for backbone in args.backbones:
            for shots in [None if s == "all" else int(s) for s in args.shots]:
                for recipe in args.recipes:
                    for seed in args.seeds:
                        key = (backbone, shots, recipe, seed, args.image_size)
                        if any(
                            (r["backbone"], r["shots"], r["recipe"], r["seed"], r["image_size"]) == key
                            for r in done
                        ):
                            continue
                        result = run_one(args.out, backbone, shots, recipe, seed, args.image_size)
                        done.append(result)
                        with open(results_file, "a") as f:
                            f.write(json.dumps(result) + "\n")
                        print(
                            json.dumps(
                                {
                                    k: result[k]
                                    for k in ("backbone", "shots", "recipe", "seed", "test/acc", "seconds")
                                }
                            ),
                            flush=True,
                        )
    print(table(done))


if __name__ == "__main__":
    main()
