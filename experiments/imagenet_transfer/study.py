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
# backbone -> its overrides; "{source}" is the checkpoint of the digits 0-4 source run (made on first use)
BACKBONES = {
    "lite0": ["backbone=efficientnet_lite0"],  # ImageNet weights; target: all 10 digits
    # ResNet-18 pretrained from scratch on digits 0-4 (make demo's related task); target: digits 5-9
    "resnet18_digits": ["backbone=resnet18", "backbone.weights={source}", "data.classes=[5,6,7,8,9]"],
}
# The previous defaults, pinned so that their rows stay reproducible: the backbone at a tenth of the head's
# LR with batch-norm statistics frozen (the first release: one LR, statistics frozen = full_lr_all).
X01_BN_EVAL = ["optim.backbone_lr_mult=0.1", "freeze.bn=eval"]
RECIPES = {
    # the defaults: full fine-tuning, one LR for every layer (optim.backbone_lr_mult=1), batch-norm statistics
    # kept when the training images fit them and updated when not (freeze.bn=adapt), at least 20 batches
    # an epoch (data.min_batches_per_epoch), batch 32
    "defaults": [],
    "lr_all_bn_train": ["optim.backbone_lr_mult=1", "freeze.bn=train"],  # one LR, statistics updated
    "x0.1_bn_eval": X01_BN_EVAL,  # the defaults before (rows measured as "defaults" then)
    # the first release's: one LR, statistics frozen
    "full_lr_all": ["optim.backbone_lr_mult=1", "freeze.bn=eval"],
    "lp_ft": ["experiment=finetune_small_data"],
    "linear_probe": ["freeze=linear_probe", "augment=none", "optim.lr=0.1"],
    "linear_probe_50ep": ["freeze=linear_probe", "augment=none", "optim.lr=0.1", "trainer.max_epochs=50"],
    "scratch": ["backbone.weights=null"],
    # variations of x0.1_bn_eval:
    "adamw": [*X01_BN_EVAL, "optim=adamw", "optim.lr=0.001"],
    "no_warmup": [*X01_BN_EVAL, "scheduler.warmup_epochs=0"],
    "one_pass": [*X01_BN_EVAL, "data.min_batches_per_epoch=0"],  # one pass per epoch (few steps)
    "backbone_lr_0.3": ["optim.backbone_lr_mult=0.3", "freeze.bn=eval"],
    "epochs_15": [*X01_BN_EVAL, "trainer.max_epochs=15"],  # 1.5x the steps
    "label_smoothing": [*X01_BN_EVAL, "loss.label_smoothing=0.1"],
    # can the head going first (LP-FT) or a longer warmup make one LR for every layer safe on lite0?
    "lp_ft_lr_all": ["experiment=finetune_small_data", "optim.backbone_lr_mult=1"],
    "warmup3_lr_all": ["optim.backbone_lr_mult=1", "freeze.bn=eval", "scheduler.warmup_epochs=3"],
    # resnet18_digits only: the recipe tuned for this task in experiments/digits_transfer (make demo's
    # former `full`: batch 10, 30 epochs of one pass, lr 0.01 on every layer)
    "digits_tuned": ["experiment=digits_finetune", "optim.backbone_lr_mult=1"],
    # lite0's collapse at one LR is a constant prediction with batch-norm statistics frozen (bn eval):
    # updated statistics make one LR safe (-> the defaults); clipped gradients do not do as well
    "lr_all_clip": ["optim.backbone_lr_mult=1", "freeze.bn=eval", "trainer.gradient_clip_val=1.0"],
}
# Rows whose recipe ends in _v0 ran before the defaults changed (results.jsonl keeps their overrides):
# one pass over the labelled images per epoch, digits batch 64, one LR for every layer.
# Rows of "defaults" measured before the batch-norm study are labelled x0.1_bn_eval (their overrides: []);
# rows of lr_all_bn_train whose overrides are [] were run as "defaults" while freeze.bn=train was the default.
COMMON = ["data=digits", "callbacks.progress.mode=none", "logger=none", "test_after_fit=true"]


def source_checkpoint(out: Path) -> str:
    """The digits 0-4 source run of resnet18_digits (experiment=digits_pretrain, as make demo runs it)."""
    run_dir = out / "runs" / "resnet18_digits_source"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file() or not Path(json.loads(metrics.read_text())["best_ckpt"]).is_file():
        overrides = [
            "experiment=digits_pretrain",
            *COMMON,
            f"hydra.run.dir={run_dir}",
            "hydra/job_logging=file_only",
        ]
        if run_in_process("train", overrides) != 0:
            raise SystemExit(f"the source run failed: {run_dir}")
    return json.loads((run_dir / "metrics.json").read_text())["best_ckpt"]


def backbone_overrides(out: Path, backbone: str, recipe: str) -> list[str]:
    overrides = BACKBONES[backbone]
    if "backbone.weights=null" in RECIPES[recipe]:  # from scratch: no source weights
        return [o for o in overrides if not o.startswith("backbone.weights=")]
    if any("{source}" in o for o in overrides):
        return [o.format(source=source_checkpoint(out)) for o in overrides]
    return overrides


def run_one(out: Path, backbone: str, shots: int | None, recipe: str, seed: int, image_size: int) -> dict:
    run_dir = out / "runs" / f"{backbone}_{shots or 'all'}_{recipe}_{image_size}px_{seed}"
    overrides = [
        *COMMON,
        *backbone_overrides(out, backbone, recipe),
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
    """Mean ± std of test/acc over seeds per (backbone, image size, recipe), a column per labels/class."""
    shots = sorted({r["shots"] or 10**9 for r in results})
    labels = ["all" if n == 10**9 else str(n) for n in shots]
    rows = [
        "| backbone | px | recipe | " + " | ".join(f"{label}/class" for label in labels) + " | s/run |",
        "|---|---|---|" + "---|" * len(labels) + "---|",
    ]
    for backbone, size, recipe in sorted({(r["backbone"], r["image_size"], r["recipe"]) for r in results}):
        runs = [
            r for r in results if (r["backbone"], r["image_size"], r["recipe"]) == (backbone, size, recipe)
        ]
        cells = []
        for n in shots:
            accs = [r["test/acc"] for r in runs if (r["shots"] or 10**9) == n and r["test/acc"] is not None]
            spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            cells.append(
                f"{statistics.mean(accs):.3f}{spread}" + ("" if len(accs) == 3 else f" ({len(accs)})")
                if accs
                else ""
            )
        seconds = "/".join(
            f"{statistics.mean(r['seconds'] for r in runs if (r['shots'] or 10**9) == n):.0f}"
            for n in shots
            if any((r["shots"] or 10**9) == n for r in runs)
        )
        rows.append(f"| {backbone} | {size} | {recipe} | " + " | ".join(cells) + f" | {seconds} |")
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
