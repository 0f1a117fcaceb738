"""What is in the data and what is wrong with it, as a training run would see it (`transferlab check`).

The report lists images per split and class, image sizes and modes, bad files, empty classes and
classes missing from a split; `check_data` returns the splits, or None when training would stop on
this data. (`tools/check.py` then runs the rest of training's checks on them.)
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from transferlab.config.schema import DataConfig
from transferlab.data.datasets import DataSplits, build_splits
from transferlab.data.scan import FolderScan, scan_image_folder
from transferlab.errors import USER_ERRORS


def _relative(scan: FolderScan, path: Path) -> str:
    return path.relative_to(scan.root).as_posix()


def scan_report(scan: FolderScan) -> str:
    """What the scan found: files per class and split, image sizes and modes, ignored and bad files."""
    layout = (
        "train/<class>/ (+ val/, test/)" if scan.layout == "splits" else "<class>/ (one folder, split by us)"
    )
    lines = [
        f"Data: {scan.root}  layout: {layout}",
        f"Scan ({scan.mode}): {scan.num_images()} images, {len(scan.bad)} bad files, "
        f"{len(scan.ignored)} other entries ignored, in {scan.seconds:.1f}s",
    ]
    images = [f for classes in scan.images.values() for files in classes.values() for f in files]
    if images:
        widths, heights = [f.width for f in images], [f.height for f in images]
        lines.append(
            f"Image sizes (width x height): min {min(widths)}x{min(heights)}, "
            f"median {statistics.median(widths):g}x{statistics.median(heights):g}, "
            f"max {max(widths)}x{max(heights)}"
        )
        modes = Counter(f.mode for f in images)
        lines.append("Modes: " + ", ".join(f"{mode} {n}" for mode, n in modes.most_common()))
    lines.append("Images found per class (usable files, before any held-out split):")
    lines += _table(
        scan.class_names,
        {split: {c: len(files) for c, files in cls.items()} for split, cls in scan.images.items()},
    )
    for split in scan.images:
        if scan.empty_classes(split):
            lines.append(f"Classes without usable images in {split}: {', '.join(scan.empty_classes(split))}")
    for split, extra in scan.extra_classes.items():
        lines.append(f"Class folders in {split} that train lacks: {', '.join(extra)}")
    if scan.ignored:
        shown = ", ".join(_relative(scan, p) for p in scan.ignored[:5])
        lines.append(
            "Ignored (not images by extension, sub-folders of a class, or files outside the class folders): "
            f"{len(scan.ignored)}, e.g. {shown}"
        )
    if scan.bad:
        lines.append(f"Bad files ({len(scan.bad)}):")
        lines += [f"  {_relative(scan, f.path)}: {f.problem}" for f in scan.bad]
    return "\n".join(lines)


def _table(class_names: list[str], counts: dict[str, dict[str, int]]) -> list[str]:
    splits = list(counts)
    width = max([5, *map(len, class_names)])
    rows = ["  " + "class".ljust(width) + "".join(s.rjust(8) for s in splits)]
    for name in class_names:
        rows.append("  " + name.ljust(width) + "".join(str(counts[s].get(name, 0)).rjust(8) for s in splits))
    return rows


def splits_report(splits: DataSplits) -> str:
    lines = [f"Splits as training would use them ({len(splits.class_names)} classes):"]
    lines += _table(splits.class_names, splits.class_counts())
    if splits.skipped:
        lines.append(
            f"{len(splits.skipped)} bad files would be skipped (data.skip_bad=true) and listed in bad_files.txt"
        )
    return "\n".join(lines)


def check_data(data: DataConfig, seed: int = 0) -> DataSplits | None:
    """Print the report; the splits a training run would use, or None (and why) when it would stop."""
    scan = None
    try:
        if data.name == "imagefolder" and Path(data.root).expanduser().is_dir():
            scan = scan_image_folder(data.root, data.scan, data.max_image_pixels)
            print(scan_report(scan) + "\n")
        splits = build_splits(data, seed=seed, scan=scan)
    except USER_ERRORS as err:
        print(f"Training would stop:\n{err}")
        return None
    print(splits_report(splits))
    return splits
