"""How long the pre-training scan takes: `make bench` or `python benchmarks/scan_folder.py --images 100000`.

Writes N small images (half PNG, half JPEG, in 10 class folders) into a temporary folder, then times
`scan_image_folder` in fast and full mode, with the process pool and in one process. The files were
just written, so they are in the page cache: this measures the scan's own cost, not a cold disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from transferlab.data import scan
from transferlab.data.scan import scan_image_folder, scan_processes
from transferlab.runtime import usable_cpu_count


def write_images(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"))


def timed(root: Path, mode: str) -> float:
    started = time.perf_counter()
    result = scan_image_folder(root, mode=mode)
    seconds = time.perf_counter() - started
    assert not result.bad, result.bad[:3]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scan_bench_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_images(root, args.images, args.size)
        print(
            f"wrote {args.images} images of {args.size}x{args.size} in {time.perf_counter() - started:.1f}s"
        )
        print(f"usable CPUs: {usable_cpu_count()}, scan processes: {scan_processes()}")
        for mode in ("fast", "full"):
            pooled = timed(root, mode)
            with mock.patch.object(scan, "scan_processes", return_value=1):
                single = timed(root, mode)
            print(
                f"scan={mode}: {pooled:.1f}s with {scan_processes()} processes "
                f"({1e6 * pooled / args.images:.0f} us/image), {single:.1f}s in one process"
            )


if __name__ == "__main__":
    main()
