"""Shared fixtures: Hydra composition of the real configs, tiny fast overrides, hand-made data."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image

from transferlab.build import check_run_inputs
from transferlab.config import compose_config as compose
from transferlab.config import parse_group, parse_train_config, register_configs
from transferlab.config.schema import DataConfig, TrainConfig
from transferlab.tools.app import run_in_process

ROOT = Path(__file__).resolve().parents[1]
register_configs()  # what every tool does before Hydra composes
CONF_DIR = ROOT / "src" / "transferlab" / "conf"

os.environ.setdefault("TRANSFERLAB_OFFLINE", "1")  # tests never download

# A run that takes seconds on a CPU: random-init ResNet-18 on 16x16 digits, a few batches.
FAST = [
    "backbone.weights=null",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "callbacks.progress.mode=plain",
]


def compose_config(
    overrides: list[str], output_dir: Path | None = None, config_name: str = "train", with_hydra: bool = False
) -> DictConfig:
    """The composed config; with_hydra: with its `hydra` node (launcher, run dir) as Hydra's callbacks see it.
    (`transferlab.config.compose_config`, but Hydra stays initialized between calls: a tenth of a second
    less for each of the suite's compositions; a tool run in this process clears it.)"""
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("transferlab.conf", version_base="1.3")
    return compose(config_name, overrides + extra, with_hydra=with_hydra)


def data_config(values: dict) -> DataConfig:
    """A data config as the schema makes it (defaults of the dataset named in `values`)."""
    return parse_group("data", values)


def validate(cfg: DictConfig) -> TrainConfig:
    """What a training run checks before it reads any data."""
    config = parse_train_config(cfg)
    check_run_inputs(config)
    return config


def run_cli(*command: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """`command` (e.g. "train.py", "-m", ...) in a new Python process; tests' callbacks stay importable."""
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_tool(tool: str, *overrides: str) -> int:
    """`transferlab <tool> overrides...` in this process; its exit status."""
    return run_in_process(tool, list(overrides))


@pytest.fixture
def fast_cfg(tmp_path):
    """compose(...) with the FAST overrides and the run directory in tmp_path/run."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config(FAST + list(overrides), output_dir or tmp_path / "run")

    return make


def write_image_folder(
    root: Path, layout: dict[str, dict[str, int]], size: int = 12, mode: str = "RGB"
) -> Path:
    """root/<split>/<class>/<i>.png with `count` images per class; pixel values differ by class."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for label, (name, count) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.integers(0, 60, (size, size, 3)) + 60 * label).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")
    return root


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    """A CIFAR-10 folder in the real on-disk format (pickled batches), small."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    meta = {
        "label_names": [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ]
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return root


def write_hostile_folder(root: Path, per_class: int = 6) -> dict[str, str]:
    """An image folder a user did not curate: good images of classes a and b (train/val/test) plus, in
    train/, one file of each kind that must be reported. Returns {bad file relative to root: problem}."""
    write_image_folder(
        root, {"train": {"a": per_class, "b": per_class}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}
    )
    a, b = root / "train" / "a", root / "train" / "b"
    (a / "zero.jpg").write_bytes(b"")
    (a / "text.png").write_text("this is not an image")
    jpeg, png = _encoded(a / "0.png", "JPEG"), (a / "1.png").read_bytes()
    (a / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (b / "cut.png").write_bytes(png[: len(png) // 2])
    (b / "broken_link.jpg").symlink_to(root / "nowhere.jpg")
    (a / "trailing_bytes.jpg").write_bytes(jpeg + b"\x00" * 100)  # valid: bytes after the end marker
    (a / ".hidden.jpg").write_bytes(b"")  # hidden: ignored, not reported
    (a / "notes.txt").write_text("not an image by extension: ignored")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    (root / "train" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"")
    return {
        "train/a/zero.jpg": "empty file",
        "train/a/text.png": "not an image",
        "train/a/cut.jpg": "truncated",
        "train/b/cut.png": "truncated",
        "train/b/broken_link.jpg": "cannot be opened",
    }


def _encoded(path: Path, image_format: str) -> bytes:
    import io

    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, image_format)
    return buffer.getvalue()


TINY_CLASSES = {"cat": 8, "dog": 8, "fox": 8}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished run on an image folder (3 classes, 40 px images, 32 px crops), calibrated:
    the run directory, with checkpoints/best.ckpt, for the after-training tools (predict, export,
    analyze). Tests must not change it (copy what they modify)."""
    base = tmp_path_factory.mktemp("trained_run")
    root = write_image_folder(
        base / "data",
        {
            "train": TINY_CLASSES,
            "val": dict.fromkeys(TINY_CLASSES, 4),
            "test": dict.fromkeys(TINY_CLASSES, 4),
        },
        size=40,
    )
    run_dir = base / "run"
    overrides = [
        *[o for o in FAST if not o.startswith(("data.image_size", "trainer.limit_"))],
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.min_batches_per_epoch=0",
        "trainer.max_epochs=3",
        "logger=none",
        "calibrate=true",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_tool("train", *overrides) == 0
    return run_dir


@pytest.fixture(scope="session")
def checkpoint(trained_run) -> Path:
    """`trained_run`'s best.ckpt (test_export, test_predict, test_quantize, test_eval_exported)."""
    return trained_run / "checkpoints" / "best.ckpt"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def quantized(checkpoint, tmp_path_factory) -> Path:
    """`trained_run`'s ResNet-18 quantized (2 calibration batches, few timed runs): the optimize run
    directory, with model.onnx (fp32), model.int8.onnx, model.json and quantize.json. Shared by
    test_quantize and test_eval_exported; tests must not change it."""
    out = tmp_path_factory.mktemp("quantized") / "run"
    status = run_tool(
        "optimize",
        f"ckpt_path={checkpoint}",
        "method=quantize",
        "quantize.calibration_batches=2",
        "latency_runs=2",
        "quantize.latency_rounds=3",
        "threads=1",
        f"hydra.run.dir={out}",
    )
    assert status == 0
    return out
