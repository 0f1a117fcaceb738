"""The scan before training: every file of an image folder checked once, header-only and in parallel.

Training, `eval.py` and `transferlab check` start with it, so a corrupt file stops a
run before its first step (or is skipped with `data.skip_bad=true`), never hours into it. The scan
only sorts files; what to do about bad files and empty classes is decided in `datasets.py`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from transferlab.config.schema import PIL_MAX_PIXELS, SPLITS
from transferlab.data.images import IMAGE_EXTENSIONS, ImageCheck, check_image, is_image_name
from transferlab.errors import DataError
from transferlab.runtime import usable_cpu_count

log = logging.getLogger(__name__)

_SERIAL_BELOW = 2000  # files: fewer are checked in this process (~0.1 s; a pool costs more than it saves)
_CHUNK = 500  # files per task: large enough that sending paths and results back costs little


def scan_processes() -> int:
    """Header parsing holds the GIL (measured: threads made a warm 100k scan 2-3x slower), so
    processes, one per usable CPU; 1 where `fork` is missing (Windows: spawn would
    re-import the user's script in every worker)."""
    if "fork" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
        return 1  # a daemonic process (e.g. a DataLoader worker) may not start children
    return usable_cpu_count()


@dataclass
class FolderScan:
    """An image folder sorted into usable images per split and class, bad files and ignored files."""

    root: Path
    # "splits": root/train/<class>/ (+ val/, test/); "single": root/<class>/, split by us; "unlabeled":
    # every image under root, one pseudo-class
    layout: str
    class_names: list[str]  # the class folders of train (layout "single": of root), sorted
    images: dict[str, dict[str, list[ImageCheck]]]  # split -> class -> usable images, sorted by path
    bad: list[ImageCheck] = field(default_factory=list)  # unusable files, each with its problem
    ignored: list[Path] = field(default_factory=list)  # other extensions and sub-folders (not read)
    extra_classes: dict[str, list[str]] = field(default_factory=dict)  # val/test folders train lacks
    mode: str = "fast"
    seconds: float = 0.0

    def split_dir(self, split: str) -> Path:
        return self.root if self.layout in ("single", UNLABELED) else self.root / split

    def empty_classes(self, split: str) -> list[str]:
        """Classes with no usable image in this split (folder missing, empty or holding only bad files)."""
        return [name for name in self.class_names if not self.images[split].get(name)]

    def num_images(self) -> int:
        return sum(len(files) for classes in self.images.values() for files in classes.values())


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _list_class_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files named like images, other entries); hidden entries are neither."""
    candidates, ignored = [], []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() and is_image_name(entry.name):  # a broken link is a candidate: reported
            candidates.append(Path(entry.path))
        else:
            ignored.append(Path(entry.path))
    return sorted(candidates), sorted(ignored)


def _layout(root: Path) -> str:
    if (root / "train").is_dir():
        others = [name for name in _class_dirs(root) if name not in SPLITS]
        if others:  # class folders beside train/ would be left out without a word
            raise DataError(
                f"{root} has train/ (so its images are read from train/, val/, test/) and also "
                f"{', '.join(others[:5])}/ beside it, which would not be read: move them under train/ (as "
                f"classes) or out of {root}"
            )
        return "splits"
    if (root / "val").is_dir() or (root / "test").is_dir():
        raise DataError(f"{root} has val/ or test/ but no train/: add {root / 'train'}/<class>/<image>")
    if not _class_dirs(root):
        raise DataError(
            f"{root / 'train'} not found and {root} has no class folders: data.root must hold "
            "train/<class>/<image> (optionally val/, test/), or <class>/<image> (split by us)"
        )
    return "single"


def _check_chunk(paths: list[Path], full: bool, max_pixels: int) -> list[ImageCheck]:
    return [check_image(path, full=full, max_pixels=max_pixels) for path in paths]


def check_images(
    paths: list[Path],
    full: bool = False,
    max_pixels: int = PIL_MAX_PIXELS,
    processes: int | None = None,
    serial_below: int = _SERIAL_BELOW,
    chunk_size: int = _CHUNK,
) -> list[ImageCheck]:
    """`check_image` on every path, in worker processes for many files; results in the order of `paths`."""
    processes = processes or scan_processes()
    check = partial(_check_chunk, full=full, max_pixels=max_pixels)
    if len(paths) < serial_below or processes == 1:
        return check(paths)
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    # fork: workers start in milliseconds and only run PIL on file names (no torch, no CUDA)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(processes, len(chunks)), mp_context=context) as pool:
        return [result for chunk in pool.map(check, chunks) for result in chunk]


UNLABELED = "unlabeled"  # the one class of an unlabelled folder (layout "unlabeled")


def _finished(scan: FolderScan, started: float, how: str) -> FolderScan:
    """The scan with its duration, logged."""
    scan.seconds = time.monotonic() - started
    log.info(
        "Scanned %s (%s): %d images, %d bad, %d other files ignored, in %.1fs",
        scan.root,
        how,
        scan.num_images(),
        len(scan.bad),
        len(scan.ignored),
        scan.seconds,
    )
    return scan


def images_under(root: Path) -> tuple[list[Path], list[Path]]:
    """The files named like images anywhere under `root` (links followed, hidden entries skipped), and
    the other entries. A folder reached again through a link (a loop, or a second link to it) is walked
    once, and listed as ignored the other times: its images would count twice, or without end."""
    images: list[Path] = []
    ignored: list[Path] = []
    walked: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders[:] = []
            ignored.append(Path(folder))
            continue
        walked.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if is_image_name(name):
                images.append(path)
            elif not name.startswith("."):
                ignored.append(path)
    return images, ignored


def scan_unlabeled_folder(
    root: str | os.PathLike, mode: str = "fast", max_pixels: int = PIL_MAX_PIXELS
) -> FolderScan:
    """Every image under `root`, in any sub-folders (hidden ones skipped), checked like a class folder's;
    all in one pseudo-class of the train split."""
    started = time.monotonic()
    root = Path(root).expanduser()
    scan = FolderScan(root, UNLABELED, [UNLABELED], {"train": {UNLABELED: []}}, mode=mode)
    candidates, scan.ignored = images_under(root)
    if not candidates:
        raise DataError(
            f"data.root={root} holds no image files, in any sub-folder (extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}): point data.root at the folder of your images"
        )
    for result in check_images(candidates, full=mode == "full", max_pixels=max_pixels):
        (scan.images["train"][UNLABELED] if result.problem is None else scan.bad).append(result)
    return _finished(scan, started, f"{mode}, unlabelled, recursively")


def scan_image_folder(
    root: str | os.PathLike, mode: str = "fast", max_pixels: int = PIL_MAX_PIXELS
) -> FolderScan:
    """Find the layout and the classes, then check every image file (see `images.check_image`)."""
    started = time.monotonic()
    root = Path(root).expanduser()
    layout = _layout(root)
    splits = ["train"] if layout == "single" else [s for s in SPLITS if (root / s).is_dir()]
    scan = FolderScan(root, layout, [], {}, mode=mode)
    scan.class_names = _class_dirs(scan.split_dir("train"))
    if not scan.class_names:
        raise DataError(f"{scan.split_dir('train')} has no class folders: expected train/<class>/<image>")
    candidates: list[tuple[str, str, Path]] = []
    for split in splits:
        found = _class_dirs(scan.split_dir(split))
        extra = sorted(set(found) - set(scan.class_names))
        if extra:
            scan.extra_classes[split] = extra
        scan.images[split] = {}
        for name in found:
            files, ignored = _list_class_folder(scan.split_dir(split) / name)
            scan.ignored += ignored
            scan.images[split][name] = []
            candidates += [(split, name, path) for path in files]
        scan.ignored += sorted(  # files outside class folders are not used
            Path(e.path)
            for e in os.scandir(scan.split_dir(split))
            if not e.is_dir() and not e.name.startswith(".")
        )
    results = check_images([path for _, _, path in candidates], full=mode == "full", max_pixels=max_pixels)
    for (split, name, _), result in zip(candidates, results, strict=True):
        if result.problem is None:
            scan.images[split][name].append(result)
        else:
            scan.bad.append(result)
    return _finished(scan, started, mode)
