"""Epoch time of a linear probe on images and on cached backbone features: `make bench`, or

    python benchmarks/feature_cache.py --backbone efficientnet_lite0 --image-size 64 --epochs 3
    python benchmarks/feature_cache.py --backbone resnet18 --weights null

Trains the same run twice through `transferlab train` (in this process): freeze=linear_probe augment=none
on digits, with model.cache_features=false (every epoch sends every image through the frozen backbone)
and true (the backbone runs once per split, then only the head trains). Prints each epoch's wall time
(training, validation and the checkpoints it writes), what the fit spends before its first epoch (with
the cache: the features of the train and val splits), the speed-up per epoch and for the whole fit, and
the metrics of both runs, which must agree: the head sees the same inputs. The default backbone is
EfficientNet-Lite0 with its real ImageNet weights (the `packaged` source: from a pip package, offline).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from transferlab.tools.app import run_in_process


class EpochTimer(L.Callback):
    """Wall-clock marks of a fit: its start, each training epoch's start, its end (the last one made is
    `EpochTimer.last`: Hydra builds it inside the run)."""

    last: EpochTimer | None = None

    def __init__(self) -> None:
        self.fit_start = 0.0
        self.epoch_starts: list[float] = []
        self.end = 0.0
        EpochTimer.last = self

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        # before the optimizers are configured: they ask for the train loader (the schedule's length),
        # which is when the train split's features are computed
        if stage == "fit" and not self.fit_start:
            self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.epoch_starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.end = time.perf_counter()

    def epochs(self) -> list[float]:
        """Seconds of each epoch: its training, its validation, the checkpoints written after it."""
        marks = [*self.epoch_starts, self.end]
        return [b - a for a, b in itertools.pairwise(marks)]


def train_once(args: argparse.Namespace, cached: bool, run_dir: Path) -> dict[str, Any]:
    overrides = [
        f"backbone={args.backbone}",
        *([f"backbone.weights={args.weights}"] if args.weights is not None else []),
        "data=digits",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        "freeze=linear_probe",
        "augment=none",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={args.accelerator}",
        "logger=none",
        "callbacks.progress.mode=none",
        f"model.cache_features={'true' if cached else 'false'}",
        f"seed={args.seed}",
        f"+callbacks.epoch_timer._target_={EpochTimer.__module__}.EpochTimer",
        f"hydra.run.dir={run_dir}",
    ]
    started = time.perf_counter()
    status = run_in_process("train", overrides)
    if status != 0:
        raise SystemExit(f"the {'cached' if cached else 'uncached'} run failed ({status}): see {run_dir}")
    timer = EpochTimer.last
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "cached": cached,
        "epochs_s": timer.epochs(),
        "before_first_epoch_s": timer.epoch_starts[0] - timer.fit_start,
        "fit_s": timer.end - timer.fit_start,
        "run_s": time.perf_counter() - started,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
        "best_ckpt_epoch": _checkpoint_epoch(run_dir / "checkpoints" / "best.ckpt"),
    }


def _checkpoint_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def report(uncached: dict[str, Any], cached: dict[str, Any]) -> dict[str, float]:
    print("\nepoch  uncached (s)  cached (s)")
    for i, (a, b) in enumerate(zip(uncached["epochs_s"], cached["epochs_s"], strict=True)):
        print(f"{i:>5}  {a:12.2f}  {b:10.3f}")
    print(
        f"before the first epoch: uncached {uncached['before_first_epoch_s']:.2f} s (sanity check), "
        f"cached {cached['before_first_epoch_s']:.2f} s (the features of train and val, sanity check)"
    )
    per_epoch = statistics.mean(uncached["epochs_s"]) / statistics.mean(cached["epochs_s"])
    fit = uncached["fit_s"] / cached["fit_s"]
    print(f"speed-up per epoch: {per_epoch:.1f}x; whole fit (extraction included): {fit:.1f}x")
    print(
        f"whole run (fit, best checkpoint's val and test, start-up): uncached {uncached['run_s']:.1f} s, "
        f"cached {cached['run_s']:.1f} s"
    )
    print(f"\n{'metric':<22}{'uncached':>14}{'cached':>14}{'|difference|':>14}")
    worst = 0.0
    for key, value in sorted(uncached["metrics"].items()):
        other = cached["metrics"][key]
        worst = max(worst, abs(value - other))
        print(f"{key:<22}{value:14.6f}{other:14.6f}{abs(value - other):14.2e}")
    print(
        f"best checkpoint: epoch {uncached['best_ckpt_epoch']} (uncached), epoch {cached['best_ckpt_epoch']} "
        f"(cached); largest metric difference {worst:.2e}"
    )
    return {"speedup_per_epoch": per_epoch, "speedup_fit": fit, "max_metric_difference": worst}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0", help="a conf/backbone preset")
    parser.add_argument("--weights", help="backbone.weights, e.g. null (random init); default: the preset's")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", type=Path, help="keep the two run directories here (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="feature_cache_bench_") as tmp:
        root = args.out or Path(tmp)
        print(
            f"{args.backbone} (weights {args.weights or 'of the preset'}), digits at {args.image_size} px, "
            f"batch {args.batch_size}, {args.epochs} epochs, {args.accelerator}"
        )
        uncached = train_once(args, cached=False, run_dir=root / "uncached")
        cached = train_once(args, cached=True, run_dir=root / "cached")
    summary = report(uncached, cached)
    return {"uncached": uncached, "cached": cached, **summary}


if __name__ == "__main__":
    main()
