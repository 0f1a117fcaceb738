"""Datasets and splits: digits, ImageFolder and CIFAR-10 (in its real file format), and the errors."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock
from urllib.error import URLError

import numpy as np
import pytest
import torch

from tests.conftest import data_config, write_cifar10, write_image_folder
from transferlab.data import datamodule
from transferlab.data.datamodule import TransferDataModule, resolve_num_workers
from transferlab.data.datasets import build_splits
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError, DataError

DIGITS = {"name": "digits", "split_seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}
TINY = Preprocessing(crop_size=16, resize_size=18)


def test_digits_split_is_fixed_stratified_and_disjoint():
    first, second = build_splits(data_config(DIGITS)), build_splits(data_config(DIGITS), seed=123)
    assert len(first.train) + len(first.val) + len(first.test) == 1797
    assert first.train.indices == second.train.indices  # the split does not follow the run seed
    parts = [set(s.indices) for s in (first.train, first.val, first.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    shares = np.bincount(first.test.labels()) / len(first.test)
    assert np.allclose(shares, 0.1, atol=0.01)


def test_class_subset_remaps_labels_in_given_order_and_shots_per_class():
    splits = build_splits(data_config({**DIGITS, "classes": [7, "3"], "shots": 5}), seed=1)
    assert splits.class_names == ["7", "3"]
    assert np.bincount(splits.train.labels()).tolist() == [5, 5]
    raw = np.asarray(splits.train.source.targets)[splits.train.indices]
    assert set(raw[splits.train.labels() == 0]) == {7}
    again = build_splits(data_config({**DIGITS, "classes": [7, "3"], "shots": 5}), seed=1)
    other = build_splits(data_config({**DIGITS, "classes": [7, "3"], "shots": 5}), seed=2)
    assert again.train.indices == splits.train.indices != other.train.indices


def test_bad_class_and_shots_requests():
    with pytest.raises(ConfigError, match="data.classes: 'cat'.*0, 1, 2"):
        build_splits(data_config({**DIGITS, "classes": ["cat", 1]}))
    with pytest.raises(DataError, match="data.shots=500 but class '0' has only"):
        build_splits(data_config({**DIGITS, "shots": 500}))


def test_digits_batches_are_three_channel_normalised_tensors():
    dm = TransferDataModule(data_config({**DIGITS, "batch_size": 8, "num_workers": 0}), TINY)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and dm.num_classes == 10


def test_imagefolder_with_val_and_test(tmp_path):
    layout = {"a": 4, "b": 3}
    write_image_folder(
        tmp_path, {"train": layout, "val": {"a": 2, "b": 2}, "test": {"a": 1, "b": 2}}, mode="L"
    )
    (tmp_path / "train" / "a" / ".hidden.png").write_bytes(b"")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    splits = build_splits(data_config({"name": "imagefolder", "root": str(tmp_path)}))
    assert splits.class_names == ["a", "b"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 4, 3)
    dm = TransferDataModule(
        data_config({"name": "imagefolder", "root": str(tmp_path), "batch_size": 4, "num_workers": 0}), TINY
    )
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (3, 3, 16, 16)  # grayscale files became 3 channels


def test_imagefolder_without_val_gets_a_stratified_split(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 10, "b": 10}})
    splits = build_splits(
        data_config({"name": "imagefolder", "root": str(tmp_path), "val_fraction": 0.2, "split_seed": 0})
    )
    assert np.bincount(splits.val.labels()).tolist() == [2, 2]
    assert splits.test is None and len(splits.train) == 16


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"data.root={tmp_path}/missing does not exist"):
        build_splits(data_config({"name": "imagefolder", "root": str(tmp_path / "missing")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/train not found"):
        build_splits(data_config({"name": "imagefolder", "root": str(tmp_path / "empty")}))
    write_image_folder(tmp_path / "noval", {"train": {"a": 3, "b": 3}})
    (tmp_path / "noval" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="noval/val holds no usable images"):
        build_splits(data_config({"name": "imagefolder", "root": str(tmp_path / "noval")}))
    write_image_folder(tmp_path / "gap", {"train": {"a": 3, "b": 3}, "test": {"a": 2}})
    with pytest.raises(DataError, match=r"class\(es\) b have no images in the test split of .*gap"):
        build_splits(data_config({"name": "imagefolder", "root": str(tmp_path / "gap")}))
    write_image_folder(tmp_path / "extra", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2, "c": 1}})
    with pytest.raises(DataError, match="class folders that train does not: c"):
        build_splits(data_config({"name": "imagefolder", "root": str(tmp_path / "extra")}))


def test_cifar10_from_files_in_its_own_format(tmp_path):
    write_cifar10(tmp_path, per_batch=20)
    splits = build_splits(
        data_config({"name": "cifar10", "root": str(tmp_path), "download": False, "val_fraction": 0.1})
    )
    assert splits.class_names[:2] == ["airplane", "automobile"]
    assert len(splits.train) + len(splits.val) == 100 and len(splits.test) == 20
    dm = TransferDataModule(
        data_config({"name": "cifar10", "root": str(tmp_path), "batch_size": 5, "num_workers": 0}), TINY
    )
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [0, 1, 2, 3, 4]


def test_cifar10_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.download=false"):
        build_splits(data_config({"name": "cifar10", "root": str(tmp_path), "download": False}))

    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", no_network)
    with pytest.raises(DataError, match="(?s)download failed.*cifar-10-python.tar.gz"):
        build_splits(data_config({"name": "cifar10", "root": str(tmp_path), "download": True}))


@pytest.mark.parametrize(
    ("cpus", "processes", "expected"),
    [(1, 1, 0), (2, 1, 1), (16, 1, 15), (64, 1, 16), (64, 4, 15), (16, 4, 3), (8, 8, 0)],
)
def test_auto_workers_share_the_usable_cpus_among_training_processes(cpus, processes, expected):
    with mock.patch.object(datamodule, "usable_cpu_count", return_value=cpus):
        assert resolve_num_workers("auto", processes) == expected


def test_bad_num_workers_name_the_key():
    for value in (-1, "many", 1.5, True):
        with pytest.raises(ConfigError, match=f"data.num_workers={value!r} must be 'auto'"):
            TransferDataModule(data_config({**DIGITS, "num_workers": value}), TINY)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 16 CPUs are mocked
def test_loaders_keep_workers_alive_and_pin_memory_only_for_a_gpu():
    dm = TransferDataModule(data_config({**DIGITS, "batch_size": 8, "num_workers": 1}), TINY)
    cpu = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")), num_devices=1, world_size=1
    )
    dm.trainer = cpu
    loader = dm.val_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers and not loader.pin_memory
    inline = TransferDataModule(data_config({**DIGITS, "batch_size": 8, "num_workers": 0}), TINY)
    inline.trainer = cpu
    assert not inline.train_dataloader().persistent_workers  # no workers to keep
    gpus = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), num_devices=4)
    auto = TransferDataModule(data_config({**DIGITS, "batch_size": 8, "num_workers": "auto"}), TINY)
    auto.trainer = gpus
    with mock.patch.object(datamodule, "usable_cpu_count", return_value=16):
        loader = auto.train_dataloader()  # built, not iterated: no GPU needed
    assert loader.pin_memory and loader.num_workers == 3 and loader.persistent_workers


def test_counts_per_class_are_logged_when_the_data_is_set_up(caplog):
    dm = TransferDataModule(data_config({**DIGITS, "class_fraction": {3: 0.1}, "num_workers": 0}), TINY)
    with caplog.at_level("INFO", logger="transferlab.data.datamodule"):
        dm.setup()
    lines = {line.split(":")[0]: line for line in caplog.messages}
    assert set(lines) == {"train", "val", "test"}
    assert lines["train"].startswith("train: 979 images (0=107, 1=109, 2=106, 3=11, 4=109")
    val = dm.class_counts()["val"]
    assert lines["val"] == f"val: 360 images ({', '.join(f'{c}={n}' for c, n in val.items())})"
    assert val["3"] > 30  # only training images are cut
