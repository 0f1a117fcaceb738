"""Datasets: scikit-learn digits (embedded, offline), CIFAR-10 and image folders.

Each builder returns the class names and, per split, a source (images + labels) with the
indices that belong to the split. `build_splits` then keeps the chosen classes (`data.classes`),
remaps their labels to 0..K-1, keeps N training images per class (`data.shots`), cuts classes to a
fraction of their training images (`data.class_fraction`) and checks that every split holds every
class. Image folders are scanned first (`scan.py`); bad files stop the build here, before training,
unless `data.skip_bad=true`.

A training run writes each split's list (`split_lines`, splits/<split>.txt) and its checkpoints keep
each split's `fingerprint`; `stored_split` reads a list back, so that eval.py tests a checkpoint on
exactly the images of its run's split, never on a re-split of a folder that has changed since.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CIFAR10

from transferlab.config.schema import PIL_MAX_PIXELS, SPLITS, DataConfig, is_set
from transferlab.data.images import IMAGE_EXTENSIONS, ImageCheck, load_rgb
from transferlab.data.scan import FolderScan, check_images, scan_image_folder, scan_unlabeled_folder
from transferlab.downloads import socket_timeout
from transferlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_BAD_FILES_SHOWN = 20  # in the error message; bad_files.txt and the check tool list them all


class ImageSource(Protocol):
    targets: list[int]

    def load(self, index: int) -> Any: ...

    def describe(self, index: int) -> str: ...

    def key(self, index: int) -> str: ...


class TensorSource:
    """Images already in memory as a uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, targets: list[int], name: str) -> None:
        self.images, self.targets, self.name = images, targets, name

    def load(self, index: int) -> tv_tensors.Image:
        return tv_tensors.Image(self.images[index])

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def key(self, index: int) -> str:
        """What the split files list: the index in the source."""
        return str(index)


class FileSource:
    """Images on disk under `root`, decoded on access as RGB (see `images.load_rgb`)."""

    def __init__(
        self, paths: list[Path], targets: list[int], root: Path, max_pixels: int = PIL_MAX_PIXELS
    ) -> None:
        self.paths, self.targets, self.root, self.max_pixels = paths, targets, root, max_pixels
        self.name = str(root)

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index], self.max_pixels)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def key(self, index: int) -> str:
        """What the split files list: the path relative to data.root."""
        return self.paths[index].relative_to(self.root).as_posix()


@dataclass
class Split:
    """The samples of one split: indices into a source, with labels remapped to 0..K-1."""

    source: ImageSource
    indices: list[int]
    label_map: dict[int, int] = field(default_factory=dict)  # source label -> training label

    def labels(self) -> np.ndarray:
        raw = np.asarray(self.source.targets)[self.indices] if self.indices else np.zeros(0, dtype=int)
        return np.asarray([self.label_map.get(int(v), int(v)) for v in raw], dtype=int)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataSplits:
    class_names: list[str]
    train: Split
    val: Split
    test: Split | None
    origin: str  # where the data came from, for messages
    skipped: list[ImageCheck] = field(default_factory=list)  # bad files left out (data.skip_bad=true)
    scan: FolderScan | None = None  # image folders: what the scan found

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: {split: {class name: count}}."""
        counts = {}
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            if split is not None:
                per_class = np.bincount(split.labels(), minlength=len(self.class_names))
                counts[name] = dict(zip(self.class_names, per_class.tolist(), strict=True))
        return counts

    def fingerprints(self) -> dict[str, str]:
        """Each split's `fingerprint`: checkpoints keep them, so that a re-split can be proven the run's."""
        return {
            name: fingerprint(split_lines(split, self.class_names))
            for name in SPLITS
            if (split := getattr(self, name)) is not None
        }


def split_lines(split: Split, class_names: list[str]) -> list[str]:
    """A run's splits/<split>.txt: one '<key>\\t<class>' line per image (the key: `ImageSource.key`)."""
    return [
        f"{split.source.key(i)}\t{class_names[label]}"
        for i, label in zip(split.indices, split.labels(), strict=True)
    ]


def fingerprint(lines: Iterable[str]) -> str:
    """sha256 of a split's sorted lines: the same images with the same classes give the same value."""
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


class SplitDataset(Dataset):
    """A split with its transform applied: yields (image tensor, label)."""

    def __init__(self, split: Split, transform) -> None:
        self.split, self.transform = split, transform
        self._labels = split.labels()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.split.source.load(self.split.indices[i])
        return self.transform(image), int(self._labels[i])


def _stratified(
    indices: list[int], labels: list[int], fraction: float, seed: int, what: str
) -> tuple[list[int], list[int]]:
    """Split indices into (rest, held_out) keeping class proportions."""
    if not 0 < fraction < 1:
        raise ConfigError(f"{what}={fraction} must be between 0 and 1")
    try:
        rest, held = train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:
        raise DataError(
            f"cannot split stratified with {what}={fraction}: {err}. Each class needs at least 2 images."
        ) from err
    return sorted(rest), sorted(held)


def _hold_out(split: Split, fraction: float, seed: int, what: str) -> tuple[Split, Split]:
    """A stratified `fraction` of a split's samples, held out: (rest, held out)."""
    rest, held = _stratified(split.indices, split.labels().tolist(), fraction, seed, what)
    return Split(split.source, rest, split.label_map), Split(split.source, held, split.label_map)


def _digits(cfg: DataConfig) -> DataSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = [int(t) for t in digits.target]
    source = TensorSource(images, targets, "digits")
    whole = Split(source, list(range(len(targets))))
    rest, test = _hold_out(whole, cfg.test_fraction, cfg.split_seed, "data.test_fraction")
    val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)  # both fractions are of the whole set
    train, val = _hold_out(rest, val_share, cfg.split_seed, "data.val_fraction")
    names = [str(n) for n in digits.target_names]
    return DataSplits(names, train, val, test, "scikit-learn digits")


class _LocalCIFAR10(CIFAR10):
    """CIFAR-10 that uses the files found under `root` as they are (no md5 check of each batch)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((folder / name).is_file() for name in names)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def prepare_cifar10(root: str | os.PathLike, download: bool) -> None:
    """Download CIFAR-10 into `root` unless its files are already there; fail clearly offline."""
    probe = _LocalCIFAR10.__new__(_LocalCIFAR10)
    probe.root = str(Path(root).expanduser())
    if probe._check_integrity():
        return
    expected = Path(probe.root) / CIFAR10.base_folder
    if not download:
        raise DataError(
            f"CIFAR-10 not found at {expected} and data.download=false. Put cifar-10-batches-py there."
        )
    try:
        with socket_timeout():
            _LocalCIFAR10(probe.root, train=True, download=True)
    except (OSError, RuntimeError) as err:
        raise DataError(
            f"CIFAR-10 not found at {expected} and the download failed ({err}).\n"
            f"Offline: copy cifar-10-python.tar.gz (from {CIFAR10.url}) into {probe.root} and extract it there, "
            "so that data.root holds cifar-10-batches-py/."
        ) from err


def _cifar10(cfg: DataConfig) -> DataSplits:
    root = str(Path(cfg.root).expanduser())
    prepare_cifar10(root, cfg.download)
    splits = {}
    for train in (True, False):
        ds = _LocalCIFAR10(root, train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
        splits[train] = TensorSource(
            images, [int(t) for t in ds.targets], "cifar10-" + ("train" if train else "test")
        )
    train_src = splits[True]
    train, val = _stratified(
        list(range(len(train_src.targets))),
        train_src.targets,
        cfg.val_fraction,
        cfg.split_seed,
        "data.val_fraction",
    )
    test_src = splits[False]
    return DataSplits(
        list(ds.classes),
        Split(train_src, train),
        Split(train_src, val),
        Split(test_src, list(range(len(test_src.targets)))),
        root,
    )


def _imagefolder_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(
            "data=imagefolder needs data.root=/path/to/images (train/<class>/ with optional val/ and test/, "
            "or <class>/ folders directly)"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    return root


def bad_files_message(scan: FolderScan) -> str:
    """The bad files (the first few, relative to data.root), what is wrong with each, and what to do."""
    shown = [f"  {f.path.relative_to(scan.root)}: {f.problem}" for f in scan.bad[:_BAD_FILES_SHOWN]]
    if len(scan.bad) > _BAD_FILES_SHOWN:
        shown.append(f"  ... and {len(scan.bad) - _BAD_FILES_SHOWN} more")
    return (
        f"{len(scan.bad)} bad image file(s) under {scan.root}; the run stops before training:\n"
        + "\n".join(shown)
        + "\nRemove or replace them, or set data.skip_bad=true to train without them (they are then "
        "listed in bad_files.txt in the run directory). To list them all: "
        f"transferlab check data=imagefolder data.root={scan.root}"
    )


def _classes_with_images(scan: FolderScan, policy: str) -> list[str]:
    """Train's classes; a class folder without usable images is an error, or dropped with a warning."""
    empty = scan.empty_classes("train")
    if not empty:
        return scan.class_names
    where = scan.split_dir("train")
    if policy == "error":
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {where} hold no usable images. Add images, remove the "
            "folder(s), or set data.empty_classes=drop to train without these classes."
        )
    kept = [name for name in scan.class_names if name not in empty]
    if len(kept) < 2:
        raise DataError(f"{where}: fewer than 2 classes have usable images ({', '.join(kept) or 'none'})")
    log.warning(
        "Dropping class(es) without usable images in %s: %s (data.empty_classes=drop); "
        "their images in other splits are left out too.",
        where,
        ", ".join(empty),
    )
    return kept


def _file_split(scan: FolderScan, split: str, class_names: list[str], max_pixels: int) -> Split:
    paths, targets = [], []
    for label, name in enumerate(class_names):
        files = scan.images[split].get(name, [])
        paths += [f.path for f in files]
        targets += [label] * len(files)
    if not paths:
        raise DataError(
            f"{scan.split_dir(split)} holds no usable images (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return Split(FileSource(paths, targets, scan.root, max_pixels), list(range(len(paths))))


def _imagefolder(cfg: DataConfig, scan: FolderScan | None = None) -> DataSplits:
    root = _imagefolder_root(cfg)
    max_pixels = cfg.max_image_pixels
    if scan is None:
        scan = scan_image_folder(root, cfg.scan, max_pixels)
    _check_bad_files(cfg, scan)
    if scan.extra_classes:
        split, extra = next(iter(scan.extra_classes.items()))
        raise DataError(
            f"{scan.split_dir(split)} has class folders that train does not: {', '.join(extra)}. Add them "
            f"to {scan.split_dir('train')} too, or move them out of {scan.split_dir(split)}."
        )
    class_names = _classes_with_images(scan, cfg.empty_classes)
    splits = {name: _file_split(scan, name, class_names, max_pixels) for name in scan.images}
    seed = cfg.split_seed
    train, val, test = splits["train"], splits.get("val"), splits.get("test")
    _check_fractions_apply(cfg, scan, has_val=val is not None, has_test=test is not None)
    test_fraction, val_fraction = cfg.test_fraction, cfg.val_fraction
    if test is None and test_fraction > 0:
        train, test = _hold_out(train, test_fraction, seed, "data.test_fraction")
        val_fraction /= 1.0 - test_fraction  # both fractions are of the whole folder
    if val is None:
        train, val = _hold_out(train, val_fraction, seed, "data.val_fraction")
        log.info("No val/ in %s: holding out a stratified part of the training images for validation.", root)
    return DataSplits(class_names, train, val, test, str(root), skipped=list(scan.bad), scan=scan)


def _check_bad_files(cfg: DataConfig, scan: FolderScan) -> None:
    """Stop on bad files, or skip them with `data.skip_bad=true` (listed in bad_files.txt)."""
    if scan.bad and not cfg.skip_bad:
        raise DataError(bad_files_message(scan))
    if scan.bad:
        log.warning(
            "Skipping %d bad image file(s) under %s (data.skip_bad=true); bad_files.txt in the run "
            "directory lists them.",
            len(scan.bad),
            scan.root,
        )


def _unlabeled(cfg: DataConfig, scan: FolderScan | None = None) -> DataSplits:
    """data=unlabeled (pretrain.py): every image under data.root, one pseudo-class; val_fraction held out."""
    if not Path(cfg.root).expanduser().is_dir():
        raise DataError(f"data.root={cfg.root} does not exist or is not a folder")
    if scan is None:
        scan = scan_unlabeled_folder(cfg.root, cfg.scan, cfg.max_image_pixels)
    _check_bad_files(cfg, scan)
    whole = _file_split(scan, "train", scan.class_names, cfg.max_image_pixels)
    if len(whole) < 2:
        raise DataError(f"data.root={scan.root} holds {len(whole)} usable image: pretraining needs more")
    train, val = _hold_out(whole, cfg.val_fraction, cfg.split_seed, "data.val_fraction")
    return DataSplits(scan.class_names, train, val, None, str(scan.root), list(scan.bad), scan)


def _check_fractions_apply(cfg: DataConfig, scan: FolderScan, has_val: bool, has_test: bool) -> None:
    """A folder with its own val/ or test/ is not split by a fraction: one that was set would be ignored."""
    for key, present, split in (("val_fraction", has_val, "val"), ("test_fraction", has_test, "test")):
        if present and is_set(cfg, key):
            raise ConfigError(
                f"data.{key}={getattr(cfg, key)} is not used: {scan.split_dir(split)} holds the {split} "
                f"images. Remove data.{key}, or move {split}/ out of data.root to have a share held out"
            )


_BUILDERS = {"digits": _digits, "cifar10": _cifar10}


def read_split_file(path: Path) -> list[str]:
    """The lines of a run's splits/<split>.txt, each checked to be '<path under data.root>\\t<class>'."""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        key = line.rsplit("\t", 1)[0]
        if "\t" not in line or Path(key).is_absolute() or ".." in Path(key).parts:
            raise DataError(
                f"{path}, line {number}: {line!r} is not '<path relative to data.root>\\t<class>'. "
                "Use the splits/ folder that the training run wrote, unchanged."
            )
    return lines


@dataclass
class StoredSplit:
    """A split read back from a run's list: the images still usable under data.root, and those not."""

    split: Split
    unusable: list[ImageCheck]  # listed files now missing or unreadable, each with its problem
    listed: int  # images the list holds


def stored_split(
    lines: list[str], cfg: DataConfig, class_names: list[str], check: bool = True
) -> StoredSplit:
    """The images of `lines` (`read_split_file`) under data.root, labelled by their place in `class_names`
    (the checkpoint's). `check`: each file is checked like the scan does (`data.scan` mode); a file gone
    from the folder is reported as missing. Deciding what unusable files mean is the caller's."""
    root = _imagefolder_root(cfg)
    paths, targets = [], []
    for line in lines:
        key, name = line.rsplit("\t", 1)
        if name not in class_names:
            raise DataError(
                f"a split list names class {name!r} ({key}), which is not among the checkpoint's classes "
                f"{class_names}: the list is another run's. Use the splits/ folder of the checkpoint's run."
            )
        paths.append(root / key)
        targets.append(class_names.index(name))
    source = FileSource(paths, targets, root, cfg.max_image_pixels)
    checks = check_images(paths, full=cfg.scan == "full", max_pixels=cfg.max_image_pixels) if check else []
    unusable = [_as_missing(c) for c in checks if c.problem is not None]
    usable = [i for i, c in enumerate(checks) if c.problem is None] if check else list(range(len(paths)))
    return StoredSplit(Split(source, usable), unusable, len(paths))


def _as_missing(result: ImageCheck) -> ImageCheck:
    """A file that is no longer there says so plainly (the check calls it 'cannot be opened')."""
    if os.path.lexists(result.path):
        return result
    return ImageCheck(result.path, problem="no longer in the folder")


def _class_id(item: Any, class_names: list[str], key: str) -> int:
    """A class given by name or integer id, as its source label id. Where some class names are numbers
    (folders 10, 2, 33, 5), an integer is a name only: as an id, `3` would silently pick the folder 5."""
    if str(item) in class_names:
        return class_names.index(str(item))
    numeric_names = any(name.lstrip("-").isdigit() for name in class_names)
    if numeric_names and not isinstance(item, bool) and isinstance(item, int):
        raise ConfigError(
            f"{key}: {item!r} is not a class name, and with class names that are numbers integers are "
            f"taken as names only. Classes: {', '.join(class_names)}"
        )
    if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(class_names):
        return item
    raise ConfigError(f"{key}: {item!r} is neither a class name nor an id. Classes: {', '.join(class_names)}")


def resolve_classes(requested: list[Any] | None, class_names: list[str]) -> list[int]:
    """`data.classes` entries are class names or integer ids; returns source label ids in the given order."""
    if not requested:
        return list(range(len(class_names)))
    chosen = [_class_id(item, class_names, "data.classes") for item in requested]
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"data.classes lists a class twice: {requested}")
    return chosen


def _keep_classes(split: Split, label_map: dict[int, int]) -> Split:
    targets = split.source.targets
    return Split(split.source, [i for i in split.indices if targets[i] in label_map], label_map)


def _few_shot(split: Split, shots: int, seed: int, class_names: list[str]) -> Split:
    labels = split.labels()
    rng = np.random.default_rng(seed)
    kept: list[int] = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise DataError(f"data.shots={shots} but class {name!r} has only {len(members)} training images")
        kept += [split.indices[j] for j in rng.choice(members, size=shots, replace=False)]
    return Split(split.source, sorted(kept), split.label_map)


def _cut_classes(
    split: Split, fractions: dict[Any, float], raw_names: list[str], label_map: dict[int, int], seed: int
) -> Split:
    """`data.class_fraction`: keep a fraction (at least one) of some classes' training images, chosen by `seed`."""
    labels = split.labels()
    rng = np.random.default_rng(seed)
    dropped: set[int] = set()
    for item, fraction in fractions.items():
        source_id = _class_id(item, raw_names, "data.class_fraction")
        if source_id not in label_map:
            raise ConfigError(f"data.class_fraction: class {item!r} is not among the kept data.classes")
        members = np.flatnonzero(labels == label_map[source_id])
        keep = max(1, round(len(members) * float(fraction)))
        dropped |= {split.indices[j] for j in members} - {
            split.indices[j] for j in rng.choice(members, size=keep, replace=False)
        }
    return Split(split.source, [i for i in split.indices if i not in dropped], split.label_map)


def classes_without_images(split: Split, class_names: list[str]) -> list[str]:
    """The classes of `class_names` that the split holds no image of."""
    counts = Counter(split.labels().tolist())
    return [name for label, name in enumerate(class_names) if counts[label] == 0]


def _check_coverage(split: Split | None, split_name: str, class_names: list[str], origin: str) -> None:
    if split is None:
        return
    if len(split) == 0:
        raise DataError(f"the {split_name} split of {origin} has no images")
    missing = classes_without_images(split, class_names)
    if missing:
        raise DataError(
            f"class(es) {', '.join(missing)} have no images in the {split_name} split of {origin}. Every "
            f"class needs images in every split: add some (image folders: {split_name}/<class>/), or leave "
            "the class out with data.classes=[...] (the classes to keep)."
        )


def build_splits(cfg: DataConfig, seed: int = 0, scan: FolderScan | None = None) -> DataSplits:
    """Build the configured dataset's splits, keep `data.classes`, sample `data.shots`, cut classes to
    `data.class_fraction`, and check them. `scan`: an image folder's scan when the caller already has it."""
    if cfg.name == "unlabeled":  # no classes: nothing to choose, sample or cover
        return _unlabeled(cfg, scan)
    raw = _imagefolder(cfg, scan) if cfg.name == "imagefolder" else _BUILDERS[cfg.name](cfg)
    if len(raw.class_names) < 2:
        raise DataError(
            f"{raw.origin} has {len(raw.class_names)} class ({', '.join(raw.class_names)}): a classifier "
            "needs at least 2 class folders"
        )
    chosen = resolve_classes(cfg.classes, raw.class_names)
    label_map = {source: new for new, source in enumerate(chosen)}
    class_names = [raw.class_names[i] for i in chosen]
    train, val = _keep_classes(raw.train, label_map), _keep_classes(raw.val, label_map)
    test = _keep_classes(raw.test, label_map) if raw.test is not None else None
    if cfg.shots:
        shots_seed = seed if cfg.shots_seed is None else cfg.shots_seed
        train = _few_shot(train, cfg.shots, shots_seed, class_names)
    if cfg.class_fraction:  # the data stays fixed across run seeds: the cut follows split_seed
        train = _cut_classes(train, cfg.class_fraction, raw.class_names, label_map, cfg.split_seed)
    for split, split_name in ((train, "train"), (val, "val"), (test, "test")):
        _check_coverage(split, split_name, class_names, raw.origin)
    return DataSplits(class_names, train, val, test, raw.origin, raw.skipped, raw.scan)
