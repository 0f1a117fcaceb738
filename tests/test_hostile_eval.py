"""eval.py on a checkpoint's own image folder tests exactly its run's split, never its training images:
the folder changed, files vanished, the checkpoint was copied, split keys typed, other data asked for."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, data_config, run_tool
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.datasets import build_splits
from transferlab.data.transforms import Preprocessing
from transferlab.errors import DataError

CLASSES = ("a", "b")
TRAIN = [*FAST, "data=imagefolder", "data.test_fraction=0.3", "data.num_workers=0", "logger=none"]


def write_images(root: Path, per_class: int, first: int = 0, seed: int = 0) -> Path:
    """root/<class>/<i>.png, 16x16, for i in first..first+per_class-1 (the layout we split ourselves)."""
    rng = np.random.default_rng(seed + first)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(first, first + per_class):
            pixels = (rng.integers(0, 60, (16, 16, 3)) + 90 * label).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@dataclass
class Run:
    data: Path  # the image folder the run trained on
    pristine: Path  # a copy of it as it was, to restore after a test changed it
    dir: Path

    @property
    def ckpt(self) -> Path:
        return self.dir / "checkpoints" / "best.ckpt"

    def listed(self, split: str) -> set[str]:
        return set((self.dir / "splits" / f"{split}.txt").read_text().splitlines())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """One short training run on a 2 x 20 image folder: 12 test images, held out by data.split_seed."""
    base = tmp_path_factory.mktemp("hostile_eval")
    data = write_images(base / "data", per_class=20)
    shutil.copytree(data, base / "pristine")
    run_dir = base / "run"
    assert run_tool("train", *TRAIN, f"data.root={data}", f"hydra.run.dir={run_dir}") == 0
    return Run(data, base / "pristine", run_dir)


@pytest.fixture
def folder(run) -> Path:
    """The run's folder, to change in a test; restored afterwards."""
    yield run.data
    shutil.rmtree(run.data)
    shutil.copytree(run.pristine, run.data)


@dataclass
class Eval:
    status: int
    dir: Path

    @property
    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics.json").read_text())

    @property
    def log(self) -> str:
        return (self.dir / "eval.log").read_text()

    def evaluated(self, split: str = "test") -> set[str]:
        return set((self.dir / "splits" / f"{split}.txt").read_text().splitlines())


def evaluate(ckpt: Path, out: Path, *overrides: str) -> Eval:
    return Eval(run_tool("eval", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *overrides), out)


def copy_checkpoint(run: Run, run_dir: Path, with_lists: bool = False) -> Path:
    """The checkpoint in another directory, <run_dir>/checkpoints/best.ckpt; with its run's lists or not."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(run.ckpt, run_dir / "checkpoints" / "best.ckpt")
    if with_lists:
        shutil.copytree(run.dir / "splits", run_dir / "splits")
    return run_dir / "checkpoints" / "best.ckpt"


def test_images_added_to_the_folder_do_not_bring_training_images_into_test(run, folder, tmp_path):
    write_images(folder, per_class=8, first=100)
    resplit = build_splits(data_config({"name": "imagefolder", "root": str(folder), "test_fraction": 0.3}))
    resplit_test = {f"{resplit.test.source.key(i)}" for i in resplit.test.indices}
    trained_on = {line.split("\t")[0] for line in run.listed("train")}
    assert resplit_test & trained_on  # the bug: a new split of the grown folder tests on training images

    result = evaluate(run.ckpt, tmp_path / "eval")
    assert result.status == 0
    assert result.evaluated() == run.listed("test") and not result.evaluated() & run.listed("train")
    source = result.metrics["split_source"]
    assert source["kind"] == "run_split_list" and source["file"] == str(run.dir / "splits" / "test.txt")
    assert (source["listed"], source["missing"], source["evaluated"]) == (12, 0, 12)
    assert sum(map(sum, result.metrics["test/confusion_matrix"])) == 12
    assert f"Evaluating the run's own test split: {run.dir / 'splits' / 'test.txt'}" in result.log


def test_val_is_the_runs_val_list_also_through_a_preset_and_another_spelling_of_the_root(run, tmp_path):
    """data=imagefolder's own data.test_fraction (0) is not what was typed: the run's (0.3) stays."""
    link = tmp_path / "link"
    link.symlink_to(run.data)
    result = evaluate(run.ckpt, tmp_path / "eval", "split=val", "data=imagefolder", f"data.root={link}/")
    assert result.status == 0
    assert result.evaluated("val") == run.listed("val")
    assert result.metrics["split_source"]["file"] == str(run.dir / "splits" / "val.txt")
    assert "Using the run's data.test_fraction=0.3 (not the data preset's test_fraction=0.0)" in result.log


def test_vanished_files_are_listed_and_stop_the_eval_unless_skip_bad(run, folder, tmp_path):
    gone = sorted(run.listed("test"))[:2]
    for line in gone:
        (folder / line.split("\t")[0]).unlink()

    refused = evaluate(run.ckpt, tmp_path / "refused")
    assert refused.status == 2 and not (refused.dir / "metrics.json").exists()
    assert "DataError: 2 of 12 images of the run's test split" in refused.log
    assert gone[0].split("\t")[0] in refused.log and "data.skip_bad=true" in refused.log
    listed = (refused.dir / "missing_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [line.split("\t")[0] for line in gone]
    assert all(line.endswith("\tno longer in the folder") for line in listed)

    rest = evaluate(run.ckpt, tmp_path / "rest", "data.skip_bad=true")
    assert rest.status == 0
    assert rest.evaluated() == run.listed("test") - set(gone)
    source = rest.metrics["split_source"]
    assert (source["listed"], source["missing"], source["evaluated"]) == (12, 2, 10)
    assert source["missing_files"] == str(rest.dir / "missing_files.txt")
    assert sum(map(sum, rest.metrics["test/confusion_matrix"])) == 10


def test_a_copied_checkpoint_resplits_only_a_folder_that_still_matches(run, folder, tmp_path):
    ckpt = copy_checkpoint(run, tmp_path / "copy")
    same = evaluate(ckpt, tmp_path / "same")
    assert same.status == 0 and same.evaluated() == run.listed("test")
    assert same.metrics["split_source"]["kind"] == "remade_and_verified"

    write_images(folder, per_class=8, first=100)
    changed = evaluate(ckpt, tmp_path / "changed")
    assert changed.status == 2 and not (changed.dir / "metrics.json").exists()
    assert f"DataError: the test split of {folder} made now is not the one" in changed.log
    assert f"copy the training run's splits/ folder to {tmp_path / 'copy' / 'splits'}" in changed.log


def test_a_checkpoint_without_fingerprints_needs_its_lists(run, folder, tmp_path):
    """Checkpoints from before split fingerprints: their run's lists, or a refusal; never a blind re-split."""
    old = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    del old[TransferDataModule.__qualname__]
    for name in ("without_lists", "with_lists"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        torch.save(old, tmp_path / name / "checkpoints" / "best.ckpt")
    shutil.copytree(run.dir / "splits", tmp_path / "with_lists" / "splits")

    refused = evaluate(tmp_path / "without_lists" / "checkpoints" / "best.ckpt", tmp_path / "refused")
    assert refused.status == 2
    assert "keeps no fingerprint to check a new split of" in refused.log
    assert f"Copy the training run's splits/ folder to {tmp_path / 'without_lists' / 'splits'}" in refused.log

    write_images(folder, per_class=8, first=100)
    listed = evaluate(tmp_path / "with_lists" / "checkpoints" / "best.ckpt", tmp_path / "listed")
    assert listed.status == 0 and listed.evaluated() == run.listed("test")


def test_lists_of_another_run_are_refused(run, tmp_path):
    """The checkpoint copied into another run's directory: that run's test list is not this one's."""
    ckpt = copy_checkpoint(run, tmp_path / "other", with_lists=True)
    (tmp_path / "other" / "splits" / "test.txt").write_text("\n".join(sorted(run.listed("train"))) + "\n")
    result = evaluate(ckpt, tmp_path / "eval")
    assert result.status == 2
    assert f"DataError: {tmp_path / 'other' / 'splits' / 'test.txt'} is not the test split" in result.log


def test_keys_that_choose_the_split_cannot_change_on_the_runs_folder(run, tmp_path):
    result = evaluate(run.ckpt, tmp_path / "eval", "data.split_seed=1")
    assert result.status == 2
    assert "ConfigError: data.split_seed=1: the checkpoint was trained with data.split_seed=0" in result.log


def test_another_folder_is_its_own_data_and_says_so(run, tmp_path):
    other = write_images(tmp_path / "other", per_class=10, seed=7)
    result = evaluate(run.ckpt, tmp_path / "eval", f"data.root={other}")
    assert result.status == 0
    assert result.metrics["split_source"]["kind"] == "other_data"
    assert f"data.root={other} is not the folder the checkpoint was trained on" in result.log
    assert all(line.split("\t")[0].split("/")[0] in CLASSES for line in result.evaluated())


def test_a_resumed_run_refuses_a_folder_that_changed_since_it_started(tmp_path):
    data = write_images(tmp_path / "data", per_class=10)
    cfg = data_config({"name": "imagefolder", "root": str(data), "test_fraction": 0.3, "num_workers": 0})
    tiny = Preprocessing(crop_size=16, resize_size=18)
    TransferDataModule(cfg, tiny).write_run_files(tmp_path / "run")
    TransferDataModule(cfg, tiny).write_run_files(tmp_path / "run")  # the same data: the same lists
    write_images(data, per_class=5, first=100)
    with pytest.raises(DataError, match=r"train.txt differs from the train split of .* made now"):
        TransferDataModule(cfg, tiny).write_run_files(tmp_path / "run")


def test_training_only_data_keys_are_refused(run: Run, tmp_path):
    training_only = (
        "imbalance=sampler",
        "allow_hflip=false",
        "min_crop_scale=0.9",
        "min_batches_per_epoch=50",
    )
    for key in (f"data.{setting}" for setting in training_only):
        result = evaluate(run.ckpt, tmp_path / key.split("=")[0], key)
        assert result.status == 2
        assert f"{key.split('=')[0]} is not read here: it shapes training only" in result.log
