"""`transferlab analyze`: the report of a checkpoint on a split, its TensorBoard images, and Grad-CAM's
layer and reshape per family."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import run_tool
from transferlab.inference import analyze as analyze_module
from transferlab.inference.gradcam import (
    CamUnsupported,
    cam_target,
    feature_map,
    grad_cam,
    tokens_to_grid,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PICTURES = ("confusion_matrix", "reliability", "top_losses", "gradcam")


class Links(HTMLParser):
    """Every <img src> and <a href> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        if tag == "a" and values.get("href"):
            self.links.append(values["href"])


def links_of(page: Path) -> Links:
    parser = Links()
    parser.feed(page.read_text())
    return parser


def split_counts(run_dir: Path, split: str) -> Counter:
    """Images per class of the run's stored list of the split ('<key>\\t<class>' lines)."""
    lines = (run_dir / "splits" / f"{split}.txt").read_text().splitlines()
    return Counter(line.split("\t")[1] for line in lines if line)


def tensorboard_images(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return set(events.Tags()["images"])


def test_analyze_writes_the_report_and_the_same_images_to_tensorboard(trained_run, tmp_path):
    out = tmp_path / "analyze"
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    assert run_tool("analyze", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", "top_losses=4") == 0
    folder = out / "report"
    summary = json.loads((folder / "summary.json").read_text())
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["calibration"]

    # per_class.csv: the exact header, one row per class, support = the split's images per class
    with (folder / "per_class.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "precision", "recall", "f1", "support"]
    counts = split_counts(trained_run, "test")
    assert {row[0]: int(row[4]) for row in rows[1:]} == dict(counts) and len(rows) == 1 + len(counts)

    # summary.json: the numbers agree with each other and with the checkpoint's temperature
    matrix = np.asarray(summary["confusion_matrix"])
    assert matrix.sum() == summary["images"] == sum(counts.values())
    assert summary["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert summary["misclassified"] == matrix.sum() - np.trace(matrix)
    assert summary["temperature"] == pytest.approx(stored["temperature"])
    assert summary["temperature_source"] == "checkpoint" and "Stored in" in summary["temperature_note"]
    assert 0 <= summary["ece_before"] <= 1 and 0 <= summary["ece_after"] <= 1
    assert summary["nll_before"] > 0 and summary["nll_after"] > 0
    assert summary["gradcam"]["target_layer"] == "backbone.layer4" and summary["gradcam"]["images"] == 8
    wrong = summary["top_losses"]
    assert len(wrong) == min(4, summary["misclassified"])
    assert all(entry["true"] != entry["predicted"] for entry in wrong)
    assert [e["probability"] for e in wrong] == sorted((e["probability"] for e in wrong), reverse=True)

    # every picture as a PNG file (the gallery when something is wrong), and all of them in the page
    pictures = [key for key in PICTURES if key != "top_losses" or wrong]
    assert sorted(summary["files"]) == sorted(pictures)
    for key in pictures:
        assert (folder / f"{key}.png").read_bytes().startswith(PNG_SIGNATURE), key
    page = links_of(folder / "report.html")
    assert len(page.images) == len(pictures)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert page.links and all((folder / link).is_file() for link in page.links)

    # the same pictures in TensorBoard
    assert tensorboard_images(out / "tensorboard") == {f"analyze/test/{key}" for key in pictures}


def test_an_uncalibrated_checkpoint_gets_a_temperature_fitted_on_val_never_the_analyzed_split(
    trained_run, tmp_path, monkeypatch
):
    """The temperature is fitted on the val split (here 6 images, the test split 12); a model that is wrong
    (the classes' folders swapped) fills the gallery; a model without a Grad-CAM layer is skipped, said in
    the report; logger=none writes no TensorBoard files."""
    checkpoint = torch.load(trained_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    del checkpoint["calibration"]
    ckpt = tmp_path / "copy" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(checkpoint, ckpt)
    swapped = swap_classes(trained_run.parent / "data", tmp_path / "swapped", val_per_class=2)
    fitted_on = []

    def recording(logits: torch.Tensor, targets: torch.Tensor) -> float:
        fitted_on.append(len(targets))
        return 1.5

    def unsupported(backbone: nn.Module) -> None:
        raise CamUnsupported("no layer known for this one")

    monkeypatch.setattr(analyze_module, "fit_temperature", recording)
    monkeypatch.setattr(analyze_module, "cam_target", unsupported)
    out = tmp_path / "analyze"
    overrides = ["logger=none", "top_losses=3", f"data.root={swapped}"]
    assert run_tool("analyze", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *overrides) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert fitted_on == [6] and summary["images"] == 12 and summary["temperature_source"] == "val"
    assert (
        summary["temperature"] == 1.5
        and "fitted now on the val split (6 images)" in summary["temperature_note"]
    )
    assert summary["misclassified"] >= 3 and len(summary["top_losses"]) == 3
    assert (out / "report" / "top_losses.png").read_bytes().startswith(PNG_SIGNATURE)
    assert summary["gradcam"] == {"skipped": "no layer known for this one"}
    assert not (out / "report" / "gradcam.png").exists()
    assert "Grad-CAM skipped: no layer known for this one" in (out / "report" / "report.html").read_text()
    assert not (out / "tensorboard").exists()


def swap_classes(root: Path, to: Path, val_per_class: int) -> Path:
    """A copy of the image folder with each class's images under the next class's name (cat -> dog ...)."""
    names = sorted(p.name for p in (root / "test").iterdir())
    for split in ("train", "val", "test"):
        for name, other in zip(names, names[1:] + names[:1], strict=True):
            shutil.copytree(root / split / name, to / split / other)
            if split == "val":
                for extra in sorted((to / split / other).iterdir())[val_per_class:]:
                    extra.unlink()
    return to


def test_a_bad_checkpoint_path_is_one_line_and_status_2(tmp_path):
    out = tmp_path / "analyze"
    assert run_tool("analyze", f"ckpt_path={tmp_path / 'none.ckpt'}", f"hydra.run.dir={out}") == 2
    errors = [line for line in (out / "analyze.log").read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"ckpt_path={tmp_path / 'none.ckpt'}: no such file" in errors[0]
    assert not (out / "report").exists()


# --- Grad-CAM's layer and reshape per family (no training) ---------------------------------------------


def heat_of(backbone: nn.Module, features: int, size: int) -> tuple[str, np.ndarray]:
    model = nn.Sequential(backbone, nn.Linear(features, 3)).eval()
    target = cam_target(backbone)
    torch.manual_seed(0)
    heat = grad_cam(model, target, torch.randn(2, 3, size, size), [0, 2])
    return target.name, heat.maps


def test_gradcam_of_a_timm_vit_uses_its_last_block_and_its_patch_grid():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=48)
    name, maps = heat_of(vit, vit.num_features, 48)
    assert name == "blocks.11.norm1"
    assert maps.shape == (2, 48, 48) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0  # 3 x 3 patches: a place, not a flat map


def test_gradcam_of_a_torchvision_cnn_uses_its_last_stage():
    from transferlab.backbones import build_backbone

    built = build_backbone("torchvision", "resnet18")
    name, maps = heat_of(built.module, built.num_features, 64)
    assert name == "layer4" and maps.shape == (2, 64, 64) and maps.std() > 0


def test_vit_tokens_become_the_patch_grid_without_the_prefix_tokens():
    tokens = torch.arange(2 * 7 * 1, dtype=torch.float32).reshape(
        2, 7, 1
    )  # 1 class + 2 register + 2x2 patches
    grid = tokens_to_grid(3, (2, 2))(tokens)
    assert grid.shape == (2, 1, 2, 2)
    assert grid[0, 0].tolist() == [[3.0, 4.0], [5.0, 6.0]]  # row-major, as the patches were cut
    assert tokens_to_grid(1, None)(torch.zeros(1, 17, 8)).shape == (1, 8, 4, 4)  # another size: a square
    with pytest.raises(CamUnsupported, match="do not form"):
        tokens_to_grid(1, None)(torch.zeros(1, 7, 8))


def test_models_without_a_known_layer_are_refused_not_guessed():
    with pytest.raises(CamUnsupported, match="not a torchvision or timm model"):
        cam_target(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(CamUnsupported, match="not an"):
        feature_map(torch.zeros(2, 16, 384))  # tokens where a feature map was expected (LeViT's stages)
