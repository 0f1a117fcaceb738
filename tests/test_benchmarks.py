"""The GPU benchmark script still runs (here on the CPU, tiny): `make bench-gpu` is for a GPU machine."""

from __future__ import annotations

import json

from benchmarks.throughput import main, make_photo_folder


def test_throughput_benchmark_measures_each_precision(tmp_path):
    out = tmp_path / "throughput.jsonl"
    argv = ["--backbone", "resnet18", "--precision", "32-true", "bf16-mixed", "--batch-size", "4"]
    argv += ["--image-size", "16", "--steps", "1", "--warmup", "1", "--accelerator", "cpu", "--out", str(out)]
    results = main(argv)
    recorded = [json.loads(line) for line in out.read_text().splitlines()]
    assert recorded == results and [r["precision"] for r in recorded] == ["32-true", "bf16-mixed"]
    assert all(r["images_per_s"] > 0 and r["timed_steps"] == 1 for r in recorded)


def test_throughput_benchmark_from_files_times_the_loader_too(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", images=80)
    argv = ["--backbone", "resnet18", "--precision", "32-true", "--memory-format", "nhwc", "--data", "files"]
    argv += ["--folder", str(folder), "--num-workers", "0", "--batch-size", "4", "--image-size", "16"]
    argv += ["--steps", "2", "--warmup", "1", "--loader-only-batches", "2", "--accelerator", "cpu"]
    (result,) = main(argv)
    assert result["data"] == "files" and result["memory_format"] == "nhwc"
    assert result["images_per_s"] > 0 and result["loader_alone_images_per_s"] > 0
    assert len(list(folder.rglob("*.jpg"))) == 80
