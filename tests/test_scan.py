"""Hostile image folders: the scan finds every bad file before training; runs stop or skip them as asked."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import data_config, write_hostile_folder, write_image_folder
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.datasets import build_splits
from transferlab.data.images import check_image
from transferlab.data.scan import check_images, scan_image_folder
from transferlab.data.transforms import Preprocessing
from transferlab.errors import DataError
from transferlab.training import train

TINY = Preprocessing(crop_size=16, resize_size=18)


def folder_cfg(root, **extra) -> dict:
    return {"name": "imagefolder", "root": str(root), "batch_size": 4, "num_workers": 0, **extra}


def relative_bad(scan) -> dict[str, str]:
    return {f.path.relative_to(scan.root).as_posix(): f.problem for f in scan.bad}


def test_scan_reports_exactly_the_bad_files_and_ignores_hidden_and_other_files(tmp_path):
    expected = write_hostile_folder(tmp_path)
    scan = scan_image_folder(tmp_path)
    found = relative_bad(scan)
    assert set(found) == set(expected)
    for path, problem in expected.items():
        assert problem in found[path], path
    assert [p.name for p in scan.ignored] == ["notes.txt"]  # hidden files are not even listed
    assert scan.class_names == ["a", "b"]  # train/.ipynb_checkpoints/ is no class
    train_a = [f.path.name for f in scan.images["train"]["a"]]
    assert "trailing_bytes.jpg" in train_a and ".hidden.jpg" not in train_a
    assert scan.num_images() == 6 + 1 + 6 + 4 + 4  # good pngs, the JPEG with trailing bytes, val, test


def test_bad_files_stop_the_build_with_their_names(tmp_path):
    expected = write_hostile_folder(tmp_path)
    with pytest.raises(DataError) as err:
        build_splits(data_config(folder_cfg(tmp_path)))
    message = str(err.value)
    assert "5 bad image file(s)" in message and "data.skip_bad=true" in message
    for path in expected:
        assert path in message


def test_skip_bad_leaves_them_out_and_keeps_the_list(tmp_path):
    expected = write_hostile_folder(tmp_path)
    splits = build_splits(data_config(folder_cfg(tmp_path, skip_bad=True)))
    assert {f.path.relative_to(tmp_path).as_posix() for f in splits.skipped} == set(expected)
    used = {splits.train.source.key(i) for i in splits.train.indices}
    assert used.isdisjoint(expected) and "train/a/trailing_bytes.jpg" in used
    assert len(splits.train) == 13


def test_many_files_are_checked_in_parallel_with_the_same_results(tmp_path):
    expected = write_hostile_folder(tmp_path, per_class=40)
    paths = sorted(tmp_path.rglob("*.*"))
    pooled = check_images(paths, processes=2, serial_below=0, chunk_size=7)  # chunks: order kept
    assert pooled == [check_image(p) for p in paths]
    assert set(relative_bad(scan_image_folder(tmp_path))) == set(expected)


def test_damage_that_only_a_full_decode_finds(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF", compression="tiff_adobe_deflate")
    data = bytearray(buffer.getvalue())
    data[100:2000] = b"\xff" * 1900  # garbage inside the compressed pixel data; header and tags intact
    (tmp_path / "train" / "a" / "deflated.tif").write_bytes(bytes(data))
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, "BMP")
    (tmp_path / "train" / "b" / "cut.bmp").write_bytes(bmp.getvalue()[:-500])
    # fast: an uncompressed BMP is decoded (as cheap as reading it); compressed TIFF is not
    assert set(relative_bad(scan_image_folder(tmp_path))) == {"train/b/cut.bmp"}
    full = relative_bad(scan_image_folder(tmp_path, mode="full"))
    assert set(full) == {"train/b/cut.bmp", "train/a/deflated.tif"}


def test_oversized_images_are_bad_files_not_a_crash(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    Image.new("L", (1200, 1000)).save(tmp_path / "train" / "a" / "big.png")  # 1.2M pixels: over our limit
    Image.new("L", (3000, 3000)).save(tmp_path / "train" / "b" / "bomb.png")  # 9M: PIL's bomb error
    found = relative_bad(scan_image_folder(tmp_path, max_pixels=1_000_000))
    assert set(found) == {"train/a/big.png", "train/b/bomb.png"}
    assert "1200x1000 = 1200000 pixels > data.max_image_pixels=1000000" in found["train/a/big.png"]
    assert "too large (9000000 pixels > data.max_image_pixels=1000000)" in found["train/b/bomb.png"]  # not 2x
    assert scan_image_folder(tmp_path, max_pixels=10_000_000).bad == []  # raise the limit: both fine


def test_a_file_damaged_after_the_scan_gives_an_error_naming_it(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    dm = TransferDataModule(data_config(folder_cfg(tmp_path)), TINY)
    dm.setup()
    victim = tmp_path / "val" / "a" / "0.png"
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DataError, match=f"{victim}: cannot be read as an image"):
        list(dm.val_dataloader())


def test_empty_class_folders_are_an_error_or_dropped(tmp_path, caplog):
    write_image_folder(tmp_path, {"train": {"a": 4, "b": 4, "c": 4}, "val": {"a": 2, "b": 2, "c": 1}})
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "val" / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"class folder\(s\) empty in .*train hold no usable images.*empty_classes=drop"
    ):
        build_splits(data_config(folder_cfg(tmp_path)))
    splits = build_splits(data_config(folder_cfg(tmp_path, empty_classes="drop")))
    assert splits.class_names == ["a", "b", "c"]
    assert "Dropping class(es) without usable images" in caplog.text and "empty" in caplog.text


def test_a_class_with_only_bad_files_in_val_is_reported(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 2}})
    (tmp_path / "val" / "b").mkdir()
    (tmp_path / "val" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DataError, match=r"class\(es\) b have no images in the val split"):
        build_splits(data_config(folder_cfg(tmp_path, skip_bad=True)))


def test_one_folder_is_split_stratified_and_reproducibly(tmp_path):
    layout = {"cat": 20, "dog": 10}
    write_image_folder(tmp_path / "tmp", {"all": layout})
    (tmp_path / "tmp" / "all").rename(tmp_path / "flat")
    cfg = folder_cfg(tmp_path / "flat", val_fraction=0.2, test_fraction=0.2, split_seed=3)
    splits = build_splits(data_config(cfg))
    assert splits.class_names == ["cat", "dog"]
    assert np.bincount(splits.test.labels()).tolist() == [4, 2]
    assert np.bincount(splits.val.labels()).tolist() == [4, 2]
    assert np.bincount(splits.train.labels()).tolist() == [12, 6]
    keys = [{s.source.key(i) for i in s.indices} for s in (splits.train, splits.val, splits.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert build_splits(data_config(cfg)).test.indices == splits.test.indices
    assert build_splits(data_config({**cfg, "split_seed": 4})).test.indices != splits.test.indices


def test_skipped_run_finishes_and_writes_bad_files_and_split_lists(fast_cfg, tmp_path):
    expected = write_hostile_folder(tmp_path / "data", per_class=8)
    run_dir = tmp_path / "run"
    metrics = train(
        fast_cfg(
            "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.skip_bad=true", "data.batch_size=4"
        )
    )
    assert metrics["class_names"] == ["a", "b"] and 0 <= metrics["test/acc"] <= 1
    bad_lines = (run_dir / "bad_files.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in bad_lines} == {str(tmp_path / "data" / p) for p in expected}
    train_list = [line.split("\t") for line in (run_dir / "splits" / "train.txt").read_text().splitlines()]
    assert len(train_list) == 8 + 1 + 8 and ["train/a/trailing_bytes.jpg", "a"] in train_list
    assert not {path for path, _ in train_list} & set(expected)
    assert len((run_dir / "splits" / "test.txt").read_text().splitlines()) == 4
    summary = json.loads((run_dir / "splits" / "summary.json").read_text())
    assert summary["counts"]["train"] == {"a": 9, "b": 8} == metrics["class_counts"]["train"]


def test_a_run_on_bad_files_stops_before_training(fast_cfg, tmp_path):
    write_hostile_folder(tmp_path / "data")
    with pytest.raises(DataError, match="bad image file"):
        train(fast_cfg("data=imagefolder", f"data.root={tmp_path / 'data'}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_folder_reached_again_through_a_link_is_read_once(tmp_path):
    """A link loop (`self -> .`) or a second link to a folder would count its images again, or without
    end, and put copies of validation images into training: each folder is walked once (pretrain's
    data=unlabeled and predict's inputs= read folders this way)."""
    from transferlab.data.scan import images_under, scan_unlabeled_folder
    from transferlab.inference.predict import collect_inputs

    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    for name in ("a/1.png", "a/2.png", "3.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "self").symlink_to(root, target_is_directory=True)
    (root / "again").symlink_to(root / "a", target_is_directory=True)
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    Image.new("RGB", (8, 8)).save(linked / "4.png")
    (root / "linked").symlink_to(linked, target_is_directory=True)  # a link to new images: followed
    images, ignored = images_under(root)
    assert sorted(p.relative_to(root).as_posix() for p in images) == [
        "3.png",
        "a/1.png",
        "a/2.png",
        "linked/4.png",
    ]
    assert {p.name for p in ignored} == {"self", "again"}
    assert len(scan_unlabeled_folder(root).images["train"]["unlabeled"]) == 4
    assert [p.name for p in collect_inputs(str(root))] == ["3.png", "1.png", "2.png", "4.png"]
