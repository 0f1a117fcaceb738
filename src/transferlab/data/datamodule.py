"""The LightningDataModule: splits from `datasets.py`, transforms from the backbone's preprocessing."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from transferlab.data.datasets import DataSplits, SplitDataset, build_splits, prepare_cifar10
from transferlab.data.transforms import Preprocessing, eval_transform, train_transform
from transferlab.distributed import exact_eval_loader
from transferlab.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def resolve_num_workers(value: Any) -> int:
    """`auto`: one worker per core but one, at most 8."""
    if value == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.num_workers={value!r} must be 'auto' or an integer >= 0")
    return value


class TransferDataModule(L.LightningDataModule):
    def __init__(self, data: dict[str, Any], preprocessing: Preprocessing, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.preprocessing, self.seed = data, preprocessing, seed
        # stored in our checkpoints (plain types): eval.py rebuilds the same data from them
        self.save_hyperparameters({"data": data, "preprocessing": preprocessing.to_dict(), "seed": seed})
        self.batch_size = int(data.get("batch_size", 32))
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size} must be >= 1")
        self.num_workers = resolve_num_workers(data.get("num_workers", "auto"))
        self.splits: DataSplits | None = None

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        if self.cfg.get("name") == "cifar10":
            prepare_cifar10(self.cfg["root"], bool(self.cfg.get("download", True)))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = build_splits(self.cfg, seed=self.seed)
        for name in SPLITS:
            split = getattr(self.splits, name)
            if split is not None:
                counts = Counter(split.labels().tolist())
                per_class = ", ".join(f"{c}={counts[i]}" for i, c in enumerate(self.splits.class_names))
                log.info("%s: %d images (%s)", name, len(split), per_class)

    def has_split(self, name: str) -> bool:
        self.setup()
        return getattr(self.splits, name) is not None

    def _loader(self, name: str, train: bool) -> DataLoader:
        self.setup()
        split = getattr(self.splits, name)
        if split is None:
            raise ConfigError(f"the dataset has no {name} split")
        augment = self.cfg.get("augment") or {}
        transform = (
            train_transform(
                self.preprocessing,
                tuple(augment.get("crop_scale", (0.5, 1.0))),
                bool(augment.get("hflip", True)),
            )
            if train
            else eval_transform(self.preprocessing)
        )
        dataset = SplitDataset(split, transform)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # Resumable randomness: the order and the augmentation of an epoch draw from the global RNG,
            # reseeded when the epoch starts (resume.ReseedEachEpoch), and nothing else may draw from it in
            # between. Each new iterator draws a worker seed, from the loader's own generator here: Lightning
            # makes the first epoch's iterator before that epoch starts, later ones after, so a draw from the
            # global RNG would shift a resumed epoch. (RandomSampler draws on the first batch.)
            sampler=RandomSampler(dataset) if train else None,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            # a last batch of one image breaks batch norm in training mode
            drop_last=train and len(dataset) % self.batch_size == 1,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    # under DDP each val/test sample is evaluated exactly once (no padding duplicates): transferlab.distributed
    def val_dataloader(self) -> DataLoader:
        return exact_eval_loader(self._loader("val", train=False), self.trainer)

    def test_dataloader(self) -> DataLoader:
        return exact_eval_loader(self._loader("test", train=False), self.trainer)

    def split_dataloader(self, name: str) -> DataLoader:
        """Evaluation loader of any split (eval.py)."""
        if name not in SPLITS:
            raise ConfigError(f"split={name!r} is not valid; choose one of: {', '.join(SPLITS)}")
        return self._loader(name, train=False)
