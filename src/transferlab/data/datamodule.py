"""The LightningDataModule: splits from `datasets.py`, transforms from the backbone's preprocessing and
the `augment` preset, class imbalance handling, and the files a run keeps about its data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from transferlab.config.schema import SPLITS, AugmentConfig, DataConfig
from transferlab.data.augment import MixingCollate, TwoViews, batch_mixer, train_transform
from transferlab.data.datasets import (
    DataSplits,
    Split,
    SplitDataset,
    build_splits,
    prepare_cifar10,
    split_lines,
)
from transferlab.data.imbalance import balanced_sampler, class_weights
from transferlab.data.loaders import exact_eval_loader
from transferlab.data.transforms import Preprocessing, eval_transform
from transferlab.errors import ConfigError, DataError
from transferlab.files import write_json
from transferlab.runtime import usable_cpu_count

if TYPE_CHECKING:
    from transferlab.finetune.feature_cache import FeatureCache

log = logging.getLogger(__name__)


def resolve_num_workers(value: int | str, processes: int = 1) -> int:
    """`auto`: the usable CPUs shared among this node's training processes, one left for the process
    itself, at most 16 per process (on a 16-core GPU machine 8 workers fed a ResNet-50 1595 images/s, 15 fed
    it 2650: experiments/scale); a number as it is (the schema checked it)."""
    if value == "auto":
        return max(0, min(16, usable_cpu_count() // max(1, processes) - 1))
    return int(value)


def _check_same_lists(folder: Path, lists: dict[str, str], origin: str) -> None:
    """A run directory that already holds split lists (a resumed or requeued run) must get the same
    lists: other ones mean the data changed since the run started, and training on would mix its
    earlier test or validation images into training (and its reports would no longer match)."""
    for name, text in lists.items():
        stored = folder / f"{name}.txt"
        if stored.is_file() and stored.read_text() != text:
            raise DataError(
                f"{stored} differs from the {name} split of {origin} made now: the data changed since this "
                "run started, so continuing it would mix images of its splits. Restore the data as it was "
                "when the run started, or start a new run."
            )


class TransferDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: DataConfig,
        preprocessing: Preprocessing,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        splits: DataSplits | None = None,
        views: Callable | None = None,
    ) -> None:
        """`splits`: splits already made (eval.py: a run's stored lists) instead of building them from `data`;
        `views`: a random view transform (pretrain method=simclr): train and val images become two views of it."""
        super().__init__()
        self.cfg, self.preprocessing, self.seed, self.augment = data, preprocessing, seed, augment
        self.views = views
        # stored in our checkpoints (plain types): eval.py rebuilds the same data from them
        self.save_hyperparameters(
            {
                "data": asdict(data),
                "preprocessing": preprocessing.to_dict(),
                "seed": seed,
                "augment": asdict(augment) if augment is not None else None,
            }
        )
        self.batch_size = data.batch_size
        self.imbalance = data.imbalance
        self.splits: DataSplits | None = splits
        self._set_up = False
        self._fingerprints: dict[str, str] | None = None
        # model.cache_features: loaders yield (backbone features, label) from this cache, not images
        self.feature_cache: FeatureCache | None = None

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        if self.cfg.name == "cifar10":
            prepare_cifar10(self.cfg.root, self.cfg.download)

    def setup(self, stage: str | None = None) -> None:
        if self._set_up:
            return
        if self.splits is None:
            self.splits = build_splits(self.cfg, seed=self.seed)
        self._set_up = True
        for name, counts in self.class_counts().items():
            per_class = ", ".join(f"{c}={n}" for c, n in counts.items())
            log.info("%s: %d images (%s)", name, sum(counts.values()), per_class)

    def has_split(self, name: str) -> bool:
        self.setup()
        return getattr(self.splits, name) is not None

    def _split(self, name: str) -> Split:
        self.setup()
        split = getattr(self.splits, name)
        if split is None:
            raise ConfigError(f"the dataset has no {name} split")
        return split

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: {split: {class name: count}}."""
        self.setup()
        return self.splits.class_counts()

    def class_weights(self) -> list[float]:
        """Loss weights N / (K * n_c) from the training counts (`data.imbalance=class_weights`)."""
        return class_weights(list(self.class_counts()["train"].values()))

    def write_run_files(self, run_dir: str | Path) -> None:
        """splits/<split>.txt and splits/summary.json (what each split holds, to audit or rebuild it),
        and bad_files.txt when bad files were skipped. Rank 0 only: the files are the same on every rank."""
        self.setup()
        folder = Path(run_dir) / "splits"
        names = self.splits.class_names
        lists = {name: self.split_file_text(name) for name in SPLITS if self.has_split(name)}
        _check_same_lists(folder, lists, self.splits.origin)
        folder.mkdir(parents=True, exist_ok=True)
        sources = {}
        for name, text in lists.items():
            (folder / f"{name}.txt").write_text(text)
            sources[name] = getattr(self._split(name).source, "name", self.splits.origin)
        write_json(
            folder / "summary.json",
            {
                "origin": self.splits.origin,
                "format": "<split>.txt: one image per line, '<key>\\t<class>'; the key is the path relative "
                "to the data root for image folders, else the index in the source",
                "sources": sources,
                "class_names": names,
                "counts": self.class_counts(),
                "split_seed": self.cfg.split_seed,
            },
        )
        if self.splits.skipped:
            lines = [f"{f.path}\t{f.problem}\n" for f in self.splits.skipped]
            (Path(run_dir) / "bad_files.txt").write_text("".join(lines))

    def split_file_text(self, name: str) -> str:
        """splits/<name>.txt: one '<key>\\t<class>' line per image of the split."""
        return "".join(f"{line}\n" for line in split_lines(self._split(name), self.class_names))

    def state_dict(self) -> dict[str, Any]:
        """Kept in every checkpoint (Lightning stores it under this class's name): each split's
        fingerprint, so that eval.py can prove that a re-split of the data is this run's split."""
        if self.splits is None:
            return {}
        if self._fingerprints is None:  # computed once: a checkpoint is saved every epoch
            self._fingerprints = self.splits.fingerprints()
        return {"split_fingerprints": self._fingerprints}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the splits are rebuilt from the config (write_run_files checks a resumed
        run's splits against the lists it wrote when it started)."""

    def _pin_memory(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _num_workers(self) -> int:
        trainer = getattr(self, "trainer", None)
        processes = trainer.num_devices if trainer is not None else 1
        return resolve_num_workers(self.cfg.num_workers, processes)

    def _loader(self, name: str, train: bool) -> DataLoader:
        split = self._split(name)
        if train:
            transform = train_transform(
                self.preprocessing,
                self.augment,
                allow_hflip=self.cfg.allow_hflip,
                min_crop_scale=self.cfg.min_crop_scale,
            )
        else:
            transform = eval_transform(self.preprocessing)
        if self.views is not None and name in ("train", "val"):
            transform = TwoViews(self.views)
        mixer = batch_mixer(self.augment, self.num_classes) if train else None
        if mixer is not None and self.feature_cache is not None:
            raise ValueError("mixup/cutmix mixes images: their features cannot be cached")
        if mixer is not None:
            log.info("mixup/cutmix: training targets are soft, so train accuracy and F1 are not computed")
        dataset = SplitDataset(split, transform)
        workers = self._num_workers()
        if self.feature_cache is not None:  # as long as the images: the same sampler, order and batches
            dataset = self.feature_cache.dataset(name, dataset, train, self.batch_size, workers)
            # in memory, so one worker at most; but one if the images had any: a loader with workers draws
            # its shuffling seed when its iterator is made (to send them indices), without any at the first
            # batch, and Lightning makes the first epoch's iterator before ReseedEachEpoch runs
            workers = min(workers, 1)
        draws = self.train_draws(len(dataset)) if train else len(dataset)
        if draws > len(dataset):  # the train loader is made once per fit: logged once
            log.info(
                "train: %d images, %d reshuffled passes per epoch (%d batches; data.min_batches_per_epoch=%d)",
                len(dataset),
                draws // len(dataset),
                -(-draws // self.batch_size),
                self.cfg.min_batches_per_epoch,
            )
        if train and self.imbalance == "sampler":
            sampler = balanced_sampler(split.labels(), self.num_classes, draws)
        elif train:
            # without replacement: more draws than images are whole passes, each reshuffled
            sampler = RandomSampler(dataset, num_samples=draws)
        else:
            sampler = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # Resumable randomness: the order and the augmentation of an epoch draw from the global RNG,
            # reseeded when the epoch starts (resume.ReseedEachEpoch), and nothing else may draw from it in
            # between. Each new iterator draws a worker seed, from the loader's own generator here: Lightning
            # makes the first epoch's iterator before that epoch starts, later ones after, so a draw from the
            # global RNG would shift a resumed epoch. (RandomSampler, and the weighted sampler of
            # imbalance=sampler, draw on the first batch.)
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            # a last batch of one image breaks batch norm in training mode
            drop_last=train and draws % self.batch_size == 1,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._pin_memory(),
            collate_fn=MixingCollate(mixer) if mixer is not None else None,
        )

    def train_draws(self, images: int) -> int:
        """Training images drawn per epoch: every image once, or whole passes up to
        `data.min_batches_per_epoch` batches when that is more (a tiny labelled set would otherwise give a
        few optimizer steps in the whole run). Each image is drawn equally often."""
        passes = max(1, -(-self.cfg.min_batches_per_epoch * self.batch_size // images))
        return passes * images

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    # under DDP each val/test sample is evaluated exactly once (no padding duplicates): transferlab.data.loaders
    def val_dataloader(self) -> DataLoader:
        return exact_eval_loader(self._loader("val", train=False), self.trainer)

    def test_dataloader(self) -> DataLoader:
        return exact_eval_loader(self._loader("test", train=False), self.trainer)

    def split_dataloader(self, name: str) -> DataLoader:
        """Evaluation loader of any split (eval.py)."""
        return self._loader(name, train=False)
