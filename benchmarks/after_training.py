"""After training, measured (experiments/after_training/README.md):

    python benchmarks/after_training.py --out experiments/after_training/results.json

1. the digits transfer task: EfficientNet-Lite0 (ImageNet) fine-tuned with the defaults on digits 5-9,
   10 labels per class, `calibrate=true`; the test split's NLL and ECE before and after the temperature
   fitted on val, per seed;
2. predict's throughput (images/s, `transferlab predict` on a folder of PNG files, in this process)
   next to a plain `torch.inference_mode()` loop over the same files with the same transform;
3. ONNX Runtime against PyTorch on the CPU: latency per batch at batch 1 and 32 (median of repeats),
   for the exported lite0 and a ResNet-50 at 224 px.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from transferlab.inference.model import load_inference_model
from transferlab.inference.predict import PredictImages, tta_views
from transferlab.inference.predictors import open_exported
from transferlab.models.calibration import expected_calibration_error
from transferlab.tools.app import run_in_process

COMMON = ["callbacks.progress.mode=none", "logger=none", "hydra/job_logging=file_only"]


def train_calibrated(out: Path, seed: int, image_size: int, shots: int) -> Path:
    run_dir = out / f"lite0_digits_{shots}shots_{image_size}px_seed{seed}"
    overrides = [
        "backbone=efficientnet_lite0",
        "data=digits",
        "data.classes=[5,6,7,8,9]",
        f"data.shots={shots}",
        f"data.image_size={image_size}",
        "calibrate=true",
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
        *COMMON,
    ]
    if run_in_process("train", overrides) != 0:
        raise SystemExit(f"training failed: {run_dir}")
    return run_dir / "checkpoints" / "best.ckpt"


def test_calibration(checkpoint: Path) -> dict[str, Any]:
    """NLL and ECE on the test split with T = 1 and with the stored temperature (fitted on val)."""
    from transferlab.checkpoints import read_checkpoint
    from transferlab.evaluation import checkpoint_data

    state = read_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        data = checkpoint_data(state, str(checkpoint), None, "test", 0, Path(scratch))
        model, card = load_inference_model(checkpoint)
        logits, targets = [], []
        with torch.inference_mode():
            for images, labels in data.datamodule.split_dataloader("test"):
                logits.append(model(images) * model.temperature)  # the raw logits (T = 1)
                targets.append(labels)
    raw, labels = torch.cat(logits), torch.cat(targets)
    result: dict[str, Any] = {"temperature": card.temperature, "test_images": len(labels)}
    for name, t in (("before", 1.0), ("after", card.temperature)):
        result[f"test_nll_{name}"] = float(torch.nn.functional.cross_entropy(raw / t, labels))
        result[f"test_ece_{name}"] = expected_calibration_error(torch.softmax(raw / t, dim=1), labels, 15)
    result["test_acc"] = float((raw.argmax(1) == labels).double().mean())
    result["val"] = state["calibration"]
    return result


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """`count` digits as size x size PNG files (grey, upscaled): real images on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    paths = []
    for i in range(count):
        pixels = (digits.images[i % len(digits.images)] * 255 / 16).astype("uint8")
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def predict_throughput(checkpoint: Path, folder: Path, files: int, workers: int, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    status = run_in_process(
        "predict",
        [
            f"ckpt_path={checkpoint}",
            f"inputs={folder}",
            f"num_workers={workers}",
            f"hydra.run.dir={out}",
            *COMMON[2:],
        ],
    )
    tool_seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"predict failed: {out}")
    model, card = load_inference_model(checkpoint)
    loader = DataLoader(
        PredictImages(sorted(folder.glob("*.png")), tta_views(card.prep, "none")),
        batch_size=32,
        num_workers=workers,
        collate_fn=lambda items: torch.cat([views for _, views, _ in items]),
    )
    started = time.perf_counter()
    with torch.inference_mode():
        for images in loader:
            model(images)
    plain_seconds = time.perf_counter() - started
    return {
        "files": files,
        "num_workers": workers,
        "predict_tool_images_per_s": files / tool_seconds,
        "predict_tool_seconds": tool_seconds,
        "plain_loop_images_per_s": files / plain_seconds,
        "plain_loop_seconds": plain_seconds,
    }


def latency(run, batch: torch.Tensor, repeats: int) -> float:
    run(batch)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def onnx_vs_pytorch(checkpoint: Path, out: Path, name: str, repeats: int) -> dict[str, Any]:
    export_dir = out / f"export_{name}"
    if (
        run_in_process(
            "export", [f"ckpt_path={checkpoint}", "format=onnx", f"hydra.run.dir={export_dir}", *COMMON[2:]]
        )
        != 0
    ):
        raise SystemExit(f"export failed: {export_dir}")
    onnx = open_exported(export_dir / "model.onnx")
    model, card = load_inference_model(checkpoint)
    size = card.prep.crop_size
    result: dict[str, Any] = {
        "model": name,
        "image_size": size,
        "parity": json.loads((export_dir / "parity.json").read_text()),
    }
    for batch_size in (1, 32):
        batch = torch.randn(batch_size, 3, size, size)
        with torch.inference_mode():
            result[f"pytorch_ms_batch{batch_size}"] = latency(model, batch, repeats)
        result[f"onnxruntime_ms_batch{batch_size}"] = latency(onnx, batch, repeats)
    return result


def resnet50_checkpoint(out: Path) -> Path:
    """A ResNet-50 checkpoint at 224 px (random weights: latency does not depend on them), one tiny epoch."""
    run_dir = out / "resnet50_224"
    overrides = [
        "backbone=resnet50",
        "backbone.weights=null",
        "data=digits",
        "data.image_size=224",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.batch_size=4",
        "data.min_batches_per_epoch=0",
        f"hydra.run.dir={run_dir}",
        *COMMON,
    ]
    if run_in_process("train", overrides) != 0:
        raise SystemExit(f"training failed: {run_dir}")
    return run_dir / "checkpoints" / "best.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=64, help="the digits task's crop size")
    parser.add_argument("--shots", type=int, default=10, help="the digits task's labels per class")
    parser.add_argument("--parts", nargs="+", default=["calibration", "throughput", "latency"])
    parser.add_argument("--files", type=int, default=512, help="images for the throughput measurement")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the results")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_after_training"))
    args = parser.parse_args()
    work = args.work.resolve()
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    results["task"] = {"shots": args.shots, "image_size": args.image_size}
    checkpoints = [train_calibrated(work, seed, args.image_size, args.shots) for seed in args.seeds]
    if "calibration" in args.parts:
        results["calibration"] = [
            {"seed": s, **test_calibration(c)} for s, c in zip(args.seeds, checkpoints, strict=True)
        ]
    if "throughput" in args.parts:
        folder = work / "images"
        write_images(folder, args.files, 96)
        results["throughput"] = [
            predict_throughput(checkpoints[0], folder, args.files, w, work / f"predict_w{w}") for w in (0, 1)
        ]
    if "latency" in args.parts:
        lite0 = f"efficientnet_lite0_{args.image_size}px"
        results["latency"] = [
            onnx_vs_pytorch(checkpoints[0], work, lite0, args.repeats),
            onnx_vs_pytorch(resnet50_checkpoint(work), work, "resnet50_224px", args.repeats),
        ]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
