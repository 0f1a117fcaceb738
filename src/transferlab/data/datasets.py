"""Datasets: scikit-learn digits (embedded, offline), CIFAR-10 and ImageFolder trees.

Each builder returns the class names and, per split, a source (images + labels) with the
indices that belong to the split. `build_splits` then keeps the chosen classes (`data.classes`),
remaps their labels to 0..K-1, keeps N training images per class (`data.shots`) and checks that
every split holds every class.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
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

from transferlab.downloads import socket_timeout
from transferlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageSource(Protocol):
    targets: list[int]

    def load(self, index: int) -> Any: ...

    def describe(self, index: int) -> str: ...


class TensorSource:
    """Images already in memory as a uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, targets: list[int], name: str) -> None:
        self.images, self.targets, self.name = images, targets, name

    def load(self, index: int) -> tv_tensors.Image:
        return tv_tensors.Image(self.images[index])

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


class FileSource:
    """Images on disk, decoded on access."""

    def __init__(self, paths: list[Path], targets: list[int]) -> None:
        self.paths, self.targets = paths, targets

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def describe(self, index: int) -> str:
        return str(self.paths[index])


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


def _digits(cfg: dict[str, Any]) -> DataSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = [int(t) for t in digits.target]
    source = TensorSource(images, targets, "digits")
    all_idx = list(range(len(targets)))
    seed = int(cfg.get("split_seed", 0))
    rest, test = _stratified(
        all_idx, targets, float(cfg.get("test_fraction", 0.2)), seed, "data.test_fraction"
    )
    val_share = float(cfg.get("val_fraction", 0.2)) / (1.0 - float(cfg.get("test_fraction", 0.2)))
    train, val = _stratified(rest, [targets[i] for i in rest], val_share, seed, "data.val_fraction")
    names = [str(n) for n in digits.target_names]
    return DataSplits(
        names, Split(source, train), Split(source, val), Split(source, test), "scikit-learn digits"
    )


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


def _cifar10(cfg: dict[str, Any]) -> DataSplits:
    root = str(Path(cfg["root"]).expanduser())
    prepare_cifar10(root, bool(cfg.get("download", True)))
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
        float(cfg.get("val_fraction", 0.1)),
        int(cfg.get("split_seed", 0)),
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


def _is_image(entry: os.DirEntry) -> bool:
    return (
        not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()
    )


def _scan_split(split_dir: Path, class_names: list[str]) -> FileSource:
    found = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    extra = sorted(set(found) - set(class_names))
    if extra:
        raise DataError(f"{split_dir} has class folders that train does not: {', '.join(extra)}")
    paths, targets = [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        files = sorted(Path(e.path) for e in os.scandir(class_dir) if _is_image(e))
        paths += files
        targets += [label] * len(files)
    if not paths:
        raise DataError(f"{split_dir} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return FileSource(paths, targets)


def _imagefolder(cfg: dict[str, Any]) -> DataSplits:
    if not cfg.get("root"):
        raise ConfigError(
            "data=imagefolder needs data.root=/path/to/images (with train/, optional val/ and test/)"
        )
    root = Path(cfg["root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"{train_dir} not found: data.root must hold train/<class>/<image> (and optionally val/, test/)"
        )
    class_names = sorted(d.name for d in os.scandir(train_dir) if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"{train_dir} has no class folders: expected train/<class>/<image>")
    train_src = _scan_split(train_dir, class_names)
    train = Split(train_src, list(range(len(train_src.targets))))
    if (root / "val").is_dir():
        val_src = _scan_split(root / "val", class_names)
        val = Split(val_src, list(range(len(val_src.targets))))
    else:
        rest, held = _stratified(
            train.indices,
            train_src.targets,
            float(cfg.get("val_fraction", 0.2)),
            int(cfg.get("split_seed", 0)),
            "data.val_fraction",
        )
        train, val = Split(train_src, rest), Split(train_src, held)
        log.info(
            "No %s: holding out a stratified %.0f%% of train for validation.",
            root / "val",
            100 * float(cfg.get("val_fraction", 0.2)),
        )
    test = None
    if (root / "test").is_dir():
        test_src = _scan_split(root / "test", class_names)
        test = Split(test_src, list(range(len(test_src.targets))))
    return DataSplits(class_names, train, val, test, str(root))


_BUILDERS = {"digits": _digits, "cifar10": _cifar10, "imagefolder": _imagefolder}


def resolve_classes(requested: list[Any] | None, class_names: list[str]) -> list[int]:
    """`data.classes` entries are class names or integer ids; returns source label ids in the given order."""
    if not requested:
        return list(range(len(class_names)))
    chosen = []
    for item in requested:
        if str(item) in class_names:
            chosen.append(class_names.index(str(item)))
        elif isinstance(item, int) and 0 <= item < len(class_names):
            chosen.append(item)
        else:
            raise ConfigError(
                f"data.classes: {item!r} is neither a class name nor an id. Classes: {', '.join(class_names)}"
            )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"data.classes lists a class twice: {requested}")
    if len(chosen) < 2:
        raise ConfigError("data.classes must keep at least 2 classes")
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


def _check_coverage(split: Split | None, split_name: str, class_names: list[str], origin: str) -> None:
    if split is None:
        return
    if len(split) == 0:
        raise DataError(f"the {split_name} split of {origin} has no images")
    counts = Counter(split.labels().tolist())
    missing = [name for label, name in enumerate(class_names) if counts[label] == 0]
    if missing:
        raise DataError(
            f"class(es) {', '.join(missing)} have no images in the {split_name} split of {origin}"
        )


def build_splits(cfg: dict[str, Any], seed: int = 0) -> DataSplits:
    """Build the configured dataset's splits, keep `data.classes`, sample `data.shots`, and check them."""
    name = cfg.get("name")
    if name not in _BUILDERS:
        raise ConfigError(f"data.name={name!r} is not valid; choose one of: {', '.join(DATASETS)}")
    raw = _BUILDERS[name](cfg)
    chosen = resolve_classes(cfg.get("classes"), raw.class_names)
    label_map = {source: new for new, source in enumerate(chosen)}
    class_names = [raw.class_names[i] for i in chosen]
    train, val = _keep_classes(raw.train, label_map), _keep_classes(raw.val, label_map)
    test = _keep_classes(raw.test, label_map) if raw.test is not None else None
    if cfg.get("shots"):
        shots_seed = cfg.get("shots_seed")
        train = _few_shot(
            train, int(cfg["shots"]), int(seed if shots_seed is None else shots_seed), class_names
        )
    for split, split_name in ((train, "train"), (val, "val"), (test, "test")):
        _check_coverage(split, split_name, class_names, raw.origin)
    return DataSplits(class_names, train, val, test, raw.origin)
