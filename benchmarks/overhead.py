"""The framework's cost over a hand-written PyTorch loop doing the same work, whole process:

    python benchmarks/overhead.py --pairs 3

The work (issue 15): ResNet-18 from random weights, 3 epochs on the 1797 digits written as a 32 px PNG
image folder, batch 64, 2 loader workers, validation every epoch, best and last checkpoint, a test of
the best checkpoint at the end. `transferlab train` (train.py, its defaults: TensorBoard logger, the
progress display) and `benchmarks/plain_loop.py` run in turn (pairs interleaved, so that a slow moment
of the machine hits both), each a new Python process; the median of the pairs' ratios is printed with a
breakdown of each side: start-up (process start to the first training batch in hand), training and validation
per epoch, checkpointing, the final test, and shutdown (the end of the test to the process's exit).

The train.py side is timed by a callback added on its command line (benchmarks/phase_timer.py), the
loop by its own clock; both write wall-clock marks (time.time()) to a JSON file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS, BATCH, WORKERS, SIZE = 3, 64, 2, 32


def write_digits_folder(root: Path) -> Path:
    """The 1797 digits as root/<class>/<i>.png, 32 x 32 grey."""
    if (root / "9").is_dir():
        return root
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
        image.save(folder / f"{i}.png")
    return root


def run_framework(data: Path, out: Path, marks: Path, extra: list[str]) -> float:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=imagefolder",
        f"data.root={data}",
        f"data.image_size={SIZE}",
        f"data.batch_size={BATCH}",
        f"data.num_workers={WORKERS}",
        "data.test_fraction=0.1",
        "data.min_batches_per_epoch=0",
        "backbone.weights=null",
        f"trainer.max_epochs={EPOCHS}",
        "callbacks.progress.mode=plain",
        "+callbacks.phase_timer._target_=phase_timer.PhaseTimer",
        f"+callbacks.phase_timer.path={marks}",
        f"hydra.run.dir={out}",
        *extra,
    ]
    return _run(command, marks)


def run_plain(data: Path, out: Path, marks: Path) -> float:
    command = [
        sys.executable,
        str(HERE / "plain_loop.py"),
        str(data),
        str(out),
        str(marks),
        f"--epochs={EPOCHS}",
        f"--batch-size={BATCH}",
        f"--workers={WORKERS}",
        f"--size={SIZE}",
    ]
    return _run(command, marks)


def _run(command: list[str], marks: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ended = time.time()
    data = json.loads(marks.read_text())
    data.update(process_start=started, process_end=ended)
    marks.write_text(json.dumps(data))
    return ended - started


def breakdown(marks: dict) -> dict[str, float]:
    """Seconds per phase from the wall-clock marks both sides write."""
    # [{train_start, first_batch, train_end, val_start, val_end, ckpt_end}, ...]. The first epoch is
    # timed from its first batch in hand: when the loader's workers start and deliver it differs
    # between Lightning (before on_train_epoch_start) and a loop (at iter()); start-up takes it on both
    # sides alike
    epochs = marks["epochs"]
    return {
        "total": marks["process_end"] - marks["process_start"],
        "startup": epochs[0]["first_batch"] - marks["process_start"],
        "train_per_epoch": statistics.mean(
            e["train_end"] - (e["first_batch"] if i == 0 else e["train_start"]) for i, e in enumerate(epochs)
        ),
        "val_per_epoch": statistics.mean(e["val_end"] - e["val_start"] for e in epochs),
        "checkpoint_per_epoch": statistics.mean(e["ckpt_end"] - e["val_end"] for e in epochs),
        "test": marks["test_end"] - marks["test_start"],
        "between_fit_and_test": marks["test_start"] - epochs[-1]["ckpt_end"],
        "shutdown": marks["process_end"] - marks["test_end"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the results")
    parser.add_argument(
        "--train-overrides",
        default="",
        help='more train.py overrides, e.g. "logger=none": what a part of the defaults costs',
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = write_digits_folder(work / "digits")
        framework = functools.partial(run_framework, extra=args.train_overrides.split())
        pairs = []
        for i in range(args.pairs):
            sides = {}
            for name, run in (("transferlab", framework), ("plain", run_plain)):
                marks = work / f"{name}_{i}.json"
                run(data, work / f"{name}_{i}", marks)
                sides[name] = breakdown(json.loads(marks.read_text()))
            sides["ratio"] = sides["transferlab"]["total"] / sides["plain"]["total"]
            pairs.append(sides)
            print(
                f"pair {i + 1}: {sides['transferlab']['total']:.1f} s / {sides['plain']['total']:.1f} s = {sides['ratio']:.2f}x"
            )
    median = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
    print(f"\nmedian ratio {median['ratio']:.2f}x (whole process, {args.pairs} interleaved pairs)")
    print(f"{'phase':24s} {'transferlab':>12s} {'plain loop':>12s}")
    for key in median["plain"]:
        print(f"{key:24s} {median['transferlab'][key]:12.2f} {median['plain'][key]:12.2f}")
    if args.out:
        result = {"train_overrides": args.train_overrides, "pairs": pairs, "median_ratio": median["ratio"]}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
