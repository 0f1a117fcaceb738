"""Training throughput (images/s) of a backbone: `make bench-gpu` on a GPU machine.

    python benchmarks/throughput.py --backbone resnet50 --precision 32-true bf16-mixed 16-mixed \
        --memory-format nchw nhwc --compile off on --data memory files

Every combination of the lists is one measurement. The model is transferlab's ImageClassifier composed
from conf/ (random init: weights do not change the speed), fully trainable, trained by Lightning:

- `--data memory`: 8 random batches made once and kept in pinned memory, so the loader costs nothing and
  the model's own speed is measured;
- `--data files`: the training run's own DataModule (data=imagefolder, its augmentation, `data.num_workers`
  workers) on a folder of JPEGs (`--folder`, or one made from scikit-learn's two sample photos: random
  crops of 256 to 427 px, about ImageNet's sizes). The loader alone is timed too: when it delivers
  barely more images/s than training consumes, it is the bottleneck.

Steps after --warmup are timed (the first ones include cuDNN autotuning, allocation and compilation),
the GPU synchronised at both ends; the GPU's utilisation is sampled (NVML) during the timed steps.
Prints a Markdown table and appends one JSON line per measurement to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from transferlab.build import build_datamodule, build_model, preprocessing_for
from transferlab.config import compose_config, parse_train_config
from transferlab.config.schema import ModelConfig, TrainConfig
from transferlab.models.classifier import ImageClassifier
from transferlab.models.speed import apply_speed_options


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled every 50 ms by NVML between start() and stop(); None without NVML."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._nvml = pynvml
        except Exception:  # no GPU, no nvidia-ml-py: the measurement goes without it
            self._nvml = None

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def start(self) -> None:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(float(np.mean(self.samples)), 1) if self.samples else None


class StepTimer(L.Callback):
    """Wall time and GPU utilisation of the training steps after `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start, self.seconds = warmup, 0, 0.0, 0.0
        self.utilisation = GpuUtilisation()
        self.gpu_percent: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.start == 0.0:
            _sync()
            self.start = time.perf_counter()
            self.utilisation.start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.start:
            self.images += len(batch[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.start
        self.gpu_percent = self.utilisation.stop()


def make_photo_folder(root: Path, images: int, classes: int = 8, seed: int = 0) -> Path:
    """`images` JPEGs (quality 90) in `classes` class folders: random crops of 256 to 427 px of
    scikit-learn's two sample photos, flipped at random. Made once per folder."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if (root / "done").exists():
        return root
    photos = load_sample_images().images  # two 427x640 RGB arrays
    rng = np.random.default_rng(seed)
    for index in range(images):
        photo = photos[index % len(photos)]
        height, width = (int(rng.integers(256, 428)) for _ in range(2))
        top, left = int(rng.integers(0, photo.shape[0] - height + 1)), int(rng.integers(0, 640 - width + 1))
        crop = photo[top : top + height, left : left + width]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{index:06d}.jpg", quality=90)
    (root / "done").touch()
    return root


def train_config(args: argparse.Namespace, folder: Path | None) -> TrainConfig:
    """The training run's config with this backbone, random init, constant LR."""
    overrides = [
        f"backbone={args.backbone}",
        "backbone.weights=null",
        "scheduler=none",
        "paths.output_dir=.",
        f"data.batch_size={args.batch_size}",
    ]
    if folder is not None:
        overrides += ["data=imagefolder", f"data.root={folder}", "data.val_fraction=0.1"]
        # one epoch holds every step: no epoch boundary (prefetch drained, a last smaller batch that
        # torch.compile recompiles for) inside the timed steps, as in an epoch of a large data set
        overrides += [f"data.min_batches_per_epoch={args.warmup + args.steps + 1}"]
        overrides += [f"data.num_workers={args.num_workers}", f"data.image_size={args.image_size}"]
    return parse_train_config(compose_config("train", overrides))


class CachedBatches(torch.utils.data.Dataset):
    """8 distinct random batches made once (pinned on a GPU machine), each index a whole batch: no
    collation or copying on the host, only the transfer to the device."""

    def __init__(self, args: argparse.Namespace, steps: int) -> None:
        generator = torch.Generator().manual_seed(0)
        size, pin = (args.batch_size, 3, args.image_size, args.image_size), torch.cuda.is_available()
        self.batches = [
            (
                torch.randn(size, generator=generator),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=generator),
            )
            for _ in range(8)
        ]
        if pin:
            self.batches = [(images.pin_memory(), labels.pin_memory()) for images, labels in self.batches]
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[index % len(self.batches)]


def loader_images_per_s(loader: DataLoader, batches: int, warmup: int = 5) -> float:
    """Images/s the loader alone delivers (workers started, first batches untimed), across epochs."""

    def endless() -> Any:
        while True:
            yield from loader

    batch_stream = endless()
    for _ in range(warmup):
        next(batch_stream)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(batch_stream)[0])
    return images / (time.perf_counter() - start)


def measure(
    args: argparse.Namespace,
    precision: str,
    memory_format: str,
    compiled: str,
    data: str,
    cudnn_benchmark: str,
) -> dict:
    steps = args.warmup + args.steps
    folder = args.folder if data == "files" else None
    config = train_config(args, folder)
    loader_rate = None
    if folder is None:
        loader = DataLoader(CachedBatches(args, steps), batch_size=None)
        names = [str(i) for i in range(args.num_classes)]
    else:
        datamodule = build_datamodule(config.data, config.backbone, config.seed, config.augment)
        datamodule.setup("fit")
        names = datamodule.class_names
        if args.loader_only_batches:
            loader_rate = loader_images_per_s(datamodule.train_dataloader(), args.loader_only_batches)
        loader = datamodule.train_dataloader()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # several measurements share a process
    torch.manual_seed(0)
    model: ImageClassifier = build_model(
        config, names, preprocessing_for(config.backbone, config.data), loss=None
    )
    apply_speed_options(model, ModelConfig(compile=compiled == "on", channels_last=memory_format == "nhwc"))
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
        benchmark=cudnn_benchmark == "on",
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "backbone": args.backbone,
        "precision": precision,
        "memory_format": memory_format,
        "compile": compiled,
        "data": data,
        "cudnn_benchmark": cudnn_benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,  # 32-true convolutions may use TF32 (torch default)
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_workers": args.num_workers if folder is not None else 0,
        "batches_per_epoch": len(loader) if folder is not None else None,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "timed_steps": args.steps,
        "images_per_s": round(timer.images / timer.seconds, 1),
        "loader_alone_images_per_s": round(loader_rate, 1) if loader_rate else None,
        "gpu_utilisation_percent": timer.gpu_percent,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "device": device,
        "torch": torch.__version__,
        "lightning": L.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", help="a conf/backbone option")
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--memory-format", nargs="+", default=["nchw"], choices=["nchw", "nhwc"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--data", nargs="+", default=["memory"], choices=["memory", "files"])
    parser.add_argument(
        "--cudnn-benchmark", nargs="+", default=["off"], choices=["off", "on"], help="trainer.benchmark"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=10, help="--data memory only")
    parser.add_argument("--num-workers", default="auto", help="data.num_workers for --data files")
    parser.add_argument("--folder", type=Path, help="an image folder for --data files (default: made)")
    parser.add_argument("--folder-images", type=int, default=8192, help="images of the made folder")
    parser.add_argument(
        "--loader-only-batches", type=int, default=30, help="batches timed on the loader alone"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", type=Path, help="append the results here, one JSON object per line")
    args = parser.parse_args(argv)
    if "files" in args.data and args.folder is None:
        args.folder = make_photo_folder(
            Path(tempfile.gettempdir()) / "transferlab_photos", args.folder_images
        )
    results = []
    for setting in itertools.product(
        args.precision, args.memory_format, args.compile, args.data, args.cudnn_benchmark
    ):
        results.append(measure(args, *setting))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    print(
        "\n| precision | memory format | compile | cudnn.benchmark | data | images/s | loader alone | GPU util % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['precision']} | {r['memory_format']} | {r['compile']} | {r['cudnn_benchmark']} | {r['data']} "
            f"| {r['images_per_s']} "
            f"| {r['loader_alone_images_per_s'] or ''} | {r['gpu_utilisation_percent'] or ''} |"
        )
    return results


if __name__ == "__main__":
    main()
