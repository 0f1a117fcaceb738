"""Does unsupervised pretraining on the digits' own (unlabelled) images pay, and which head transfers best?

A: ResNet-18 pretrained by `transferlab pretrain` (method=autoencoder | simclr) on the 1797 scikit-learn
digits written without labels, then fine-tuned on 2/5/10 labels per class; against scratch and ImageNet
EfficientNet-Lite0. B: EfficientNet-Lite0's four heads at 10 labels per class.

Runs `transferlab pretrain` / `train` in this process, one after another, and appends one JSON line per run
to results.jsonl (a run already there is skipped, so the study resumes). `--timing` runs one epoch of each
pretraining; `--table` prints the tables of what results.jsonl holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from transferlab.tools.app import run_in_process

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
RESULTS = HERE / "results.jsonl"
SIZE = 32
COMMON = ["callbacks.progress.mode=none", "logger=none", "hydra/job_logging=file_only"]
# the unlabelled digits keep what data=digits sets for augmentation: no flip, crops of >= 80% of the area
PRETRAIN = [
    "backbone=resnet18",
    "data=unlabeled",
    f"data.image_size={SIZE}",
    "data.batch_size=64",
    "data.allow_hflip=false",
    "data.min_crop_scale=0.8",
    "data.num_workers=0",
]
METHODS = ("autoencoder", "simclr")
STARTS = {  # the fine-tuning starts of A; "{autoencoder}" / "{simclr}": that pretraining's best.ckpt
    "scratch": ["backbone=resnet18", "backbone.weights=null"],
    "autoencoder": ["backbone=resnet18", "backbone.weights={autoencoder}"],
    "simclr": ["backbone=resnet18", "backbone.weights={simclr}"],
    "imagenet_lite0": ["backbone=efficientnet_lite0"],
}
# follow-up (--bn-train): the digits-pretrained starts with batch-norm statistics updated while fine-tuning;
# freeze.bn=adapt keeps them (they fit: the pretraining saw these images), and some seeds then collapse
BN_TRAIN = {f"{m}_bn_train": [*STARTS[m], "freeze.bn=train"] for m in ("autoencoder", "simclr")}
STARTS.update(BN_TRAIN)
HEADS = ("linear", "mlp", "gap", "attention")


def load() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []


def append(result: dict) -> None:
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "overrides"}), flush=True)


def write_unlabeled() -> Path:
    """The 1797 digits as 8x8 grayscale PNGs (0..16 scaled to 0..255), numbered, without labels."""
    folder = RUNS / "digits_unlabeled"
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images
    if len(list(folder.glob("*.png"))) != len(images):
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            pixels = np.clip(np.round(image * 255.0 / 16.0), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return folder


def run_tool(tool: str, overrides: list[str], run_dir: Path) -> tuple[int, dict, float]:
    """One run in this process: its exit status, its metrics.json (empty if it failed), its seconds."""
    started = time.monotonic()
    status = run_in_process(tool, overrides)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if status == 0 else {}
    return status, metrics, round(time.monotonic() - started, 1)


def pretrain(method: str, epochs: int, done: list[dict]) -> dict:
    """One pretraining run (resumable: reuses the results.jsonl line of a finished one)."""
    for r in done:
        if (
            r.get("kind") == "pretrain"
            and (r["method"], r["epochs"]) == (method, epochs)
            and r["status"] == 0
        ):
            return r
    run_dir = RUNS / f"pretrain_{method}_{epochs}ep"
    overrides = [
        *PRETRAIN,
        f"method={method}",
        f"data.root={write_unlabeled()}",
        f"trainer.max_epochs={epochs}",
        *COMMON,
        f"hydra.run.dir={run_dir}",
    ]
    status, metrics, seconds = run_tool("pretrain", overrides, run_dir)
    result = {
        "kind": "pretrain",
        "method": method,
        "epochs": epochs,
        "status": status,
        "val/loss": metrics.get("val/loss"),
        "best_ckpt": metrics.get("best_ckpt"),
        "seconds": seconds,
        "overrides": overrides,
    }
    done.append(result)
    append(result)
    return result


def finetune(start: str, head: str, shots: int, seed: int, ckpts: dict, done: list[dict]) -> None:
    key = (start, head, shots, seed)
    if any(r.get("kind") == "train" and (r["start"], r["head"], r["shots"], r["seed"]) == key for r in done):
        return
    run_dir = RUNS / f"{start}_{head}_{shots}shots_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off before results.jsonl recorded it
    overrides = [
        "data=digits",
        *[o.format(**ckpts) for o in STARTS[start]],
        f"head={head}",
        f"data.image_size={SIZE}",
        f"data.shots={shots}",
        f"seed={seed}",
        "test_after_fit=true",
        *COMMON,
        f"hydra.run.dir={run_dir}",
    ]
    status, metrics, seconds = run_tool("train", overrides, run_dir)
    result = {
        "kind": "train",
        "start": start,
        "head": head,
        "shots": shots,
        "seed": seed,
        "status": status,
        "test/acc": metrics.get("test/acc"),
        "seconds": seconds,
        "overrides": overrides,
    }
    done.append(result)
    append(result)


def cell(accs: list[float]) -> str:
    if not accs:
        return "not run"
    spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
    return f"{statistics.mean(accs):.3f}{spread}" + ("" if len(accs) == 3 else f" ({len(accs)} seeds)")


def tables(done: list[dict]) -> str:
    out = [
        "Pretraining (ResNet-18, 32 px, batch 64, unlabelled digits):",
        "",
        "| method | epochs | minutes | best val/loss |",
        "|---|---|---|---|",
    ]
    for r in done:
        if r.get("kind") == "pretrain":
            loss = f"{r['val/loss']:.4f}" if r["val/loss"] is not None else f"failed ({r['status']})"
            out.append(f"| {r['method']} | {r['epochs']} | {r['seconds'] / 60:.1f} | {loss} |")
    train = [r for r in done if r.get("kind") == "train"]

    def runs(start: str, head: str, shots: int) -> list[dict]:
        return [r for r in train if (r["start"], r["head"], r["shots"]) == (start, head, shots)]

    def row(label: str, start: str, head: str, shots: list[int]) -> str:
        cells = [
            cell([r["test/acc"] for r in runs(start, head, n) if r["test/acc"] is not None]) for n in shots
        ]
        secs = [r["seconds"] for n in shots for r in runs(start, head, n)]
        failed = sum(r["status"] != 0 for n in shots for r in runs(start, head, n))
        note = f" ({failed} failed)" if failed else ""
        return (
            f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(secs):.0f}{note} |"
            if secs
            else (f"| {label} | " + " | ".join(cells) + " | - |")
        )

    out += [
        "",
        "A: test/acc (mean ± std over seeds 1-3), fine-tuned on digits, 32 px, head=linear:",
        "",
        "| start | 2/class | 5/class | 10/class | s/run |",
        "|---|---|---|---|---|",
    ]
    out += [row(start, start, "linear", [2, 5, 10]) for start in STARTS]
    out += [
        "",
        "B: EfficientNet-Lite0 (ImageNet), 10 labels/class, 32 px:",
        "",
        "| head | 10/class | s/run |",
        "|---|---|---|",
    ]
    out += [row(head, "imagenet_lite0", head, [10]) for head in HEADS]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs (both methods)")
    parser.add_argument("--timing", action="store_true", help="one epoch of each pretraining, then stop")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument(
        "--bn-train",
        nargs="*",
        type=int,
        metavar="SHOTS",
        help="only the freeze.bn=train follow-up at these labels per class",
    )
    parser.add_argument("--table", action="store_true", help="print the tables of results.jsonl and stop")
    args = parser.parse_args()
    done = load()
    if args.table:
        print(tables(done))
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.timing:
        for method in METHODS:
            pretrain(method, 1, done)
        print(tables(done))
        return
    ckpts = {}
    for method in METHODS:
        result = pretrain(method, args.epochs, done)
        if result["status"] != 0:
            raise SystemExit(f"pretraining {method} failed: {RUNS}/pretrain_{method}_{args.epochs}ep")
        ckpts[method] = result["best_ckpt"]
    if args.bn_train is not None:
        for shots in args.bn_train:
            for start in BN_TRAIN:
                for seed in args.seeds:
                    finetune(start, "linear", shots, seed, ckpts, done)
        print(tables(done))
        return
    # priority: 5 and 10 labels per class for every start, then the heads (B), then 2 labels per class
    for shots in (5, 10):
        for start in [s for s in STARTS if s not in BN_TRAIN]:
            for seed in args.seeds:
                finetune(start, "linear", shots, seed, ckpts, done)
    for head in HEADS:  # head=linear is A's imagenet_lite0 10/class run (the same overrides)
        for seed in args.seeds:
            finetune("imagenet_lite0", head, 10, seed, ckpts, done)
    for start in [s for s in STARTS if s not in BN_TRAIN]:
        for seed in args.seeds:
            finetune(start, "linear", 2, seed, ckpts, done)
    print(tables(done))


if __name__ == "__main__":
    main()
