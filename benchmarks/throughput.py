"""Training throughput (images/s) of a backbone at each precision: `make bench-gpu` on a GPU machine.

    python benchmarks/throughput.py --backbone resnet50 --precision 32-true bf16-mixed 16-mixed

The model is transferlab's ImageClassifier composed from conf/ (random init: weights do not change the
speed), trained by Lightning on random 224x224 images already in memory, so that the loader is not what
is measured. Steps after --warmup are timed (the first ones include cuDNN autotuning and allocation).
Prints a Markdown table and appends one JSON line per setting to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from transferlab.build import build_model, preprocessing_for
from transferlab.config import compose_config, parse_train_config
from transferlab.config.schema import ModelConfig
from transferlab.models.classifier import ImageClassifier
from transferlab.models.speed import apply_speed_options


class StepTimer(L.Callback):
    """Wall time of the training steps after `warmup`, the device synchronised at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start, self.seconds = warmup, 0, 0.0, 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start


def benchmark_model(backbone: str, num_classes: int) -> ImageClassifier:
    """The training run's model (conf/train.yaml with this backbone), random init: weights do not change speed."""
    overrides = [f"backbone={backbone}", "backbone.weights=null", "scheduler=none", "paths.output_dir=."]
    config = parse_train_config(compose_config("train", overrides))
    names = [str(i) for i in range(num_classes)]
    return build_model(config, names, preprocessing_for(config.backbone, config.data), loss=None)


def measure(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    torch.manual_seed(0)
    steps = args.warmup + args.steps
    images = torch.randn(args.batch_size * steps, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.num_classes, (len(images),))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, pin_memory=True)
    model = benchmark_model(args.backbone, args.num_classes)
    apply_speed_options(model, ModelConfig(compile=args.compile, channels_last=args.channels_last))
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "backbone": args.backbone,
        "precision": precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "timed_steps": args.steps,
        "images_per_s": round(timer.images / timer.seconds, 1),
        "device": device,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", help="a conf/backbone option")
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, help="append the results here, one JSON object per line")
    args = parser.parse_args(argv)
    results = [measure(args, precision) for precision in args.precision]
    print("| backbone | precision | batch | images/s | device |\n|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['backbone']} | {r['precision']} | {r['batch_size']} | {r['images_per_s']} | {r['device']} |"
        )
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    main()
