"""predict: which files, exact rows for good and bad files, the same probabilities as the checkpoint's own
test-time outputs, test-time augmentation, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import run_tool
from transferlab.config.schema import PredictConfig
from transferlab.errors import ConfigError
from transferlab.inference.model import load_inference_model
from transferlab.inference.predict import check_tta, collect_inputs, read_image, tta_views


def read_csv(path: Path) -> list[list[str]]:
    with path.open() as f:
        return list(csv.reader(f))


def predict(tmp_path: Path, *overrides: str, name: str = "out") -> tuple[int, Path]:
    out = tmp_path / name
    return run_tool("predict", *overrides, f"hydra.run.dir={out}", "num_workers=0"), out


@pytest.fixture(scope="module")
def test_images(trained_run) -> list[Path]:
    """The fixture's test split on disk, in the order a folder is read (sorted)."""
    return sorted((trained_run.parent / "data" / "test").rglob("*.png"))  # conftest.trained_run's data


def expected_probabilities(checkpoint: Path, paths: list[Path]) -> torch.Tensor:
    """softmax(model(eval transform(image)) / T), computed here without predict's code path."""
    model, card = load_inference_model(checkpoint)
    transform = tta_views(card.prep, "none")
    images = torch.cat([transform(read_image(p)) for p in paths])
    with torch.no_grad():
        return torch.softmax(model(images), dim=1)


def test_a_folder_mixing_good_and_bad_files(tmp_path, checkpoint, test_images):
    folder = tmp_path / "new_photos"
    (folder / "sub").mkdir(parents=True)
    good = [folder / "a.png", folder / "sub" / "b.png"]
    shutil.copy(test_images[0], good[0])
    shutil.copy(test_images[-1], good[1])
    (folder / "notes.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(test_images[1].read_bytes()[:60])  # a copy that stopped early
    (folder / "readme.txt").write_text("not an image name: never read")
    status, out = predict(tmp_path, f"ckpt_path={checkpoint}", f"inputs={folder}", "top_k=2")

    assert status == 2  # some files failed; the others are still predicted
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    assert [row[0] for row in rows[1:]] == [str(p) for p in good]
    probabilities = expected_probabilities(checkpoint, good)
    names = ["cat", "dog", "fox"]
    for row, p in zip(rows[1:], probabilities, strict=True):
        top = p.topk(2)
        assert row[1:] == [
            names[top.indices[0]],
            f"{top.values[0]:.6f}",
            names[top.indices[1]],
            f"{top.values[1]:.6f}",
        ]
    errors = read_csv(out / "predict_errors.csv")
    assert errors[0] == ["path", "reason"]
    reasons = dict(errors[1:])
    assert sorted(reasons) == sorted(str(folder / n) for n in ("notes.jpg", "empty.png", "cut.png"))
    assert reasons.pop(str(folder / "empty.png")) == "empty file (0 bytes)"
    assert all(reason.startswith("not a readable image (") for reason in reasons.values())


def test_images_above_max_image_pixels_fail_without_being_decoded(tmp_path, checkpoint, test_images):
    """The test images are 40 x 40 = 1600 pixels: with max_image_pixels=1000 every one is a failure row."""
    inputs = f"inputs={test_images[0].parent}"
    status, out = predict(tmp_path, f"ckpt_path={checkpoint}", inputs, "max_image_pixels=1000", name="small")
    assert status == 2 and not read_csv(out / "predictions.csv")[1:]
    reasons = [reason for _, reason in read_csv(out / "predict_errors.csv")[1:]]
    assert len(reasons) == len(list(test_images[0].parent.glob("*.png"))) and "1000" in reasons[0]
    # under half the image: PIL refuses it when opening, and names twice the limit; the reason names ours
    status, out = predict(tmp_path, f"ckpt_path={checkpoint}", inputs, "max_image_pixels=100", name="tiny")
    [reason, *_] = [reason for _, reason in read_csv(out / "predict_errors.csv")[1:]]
    assert status == 2 and reason.startswith("too large (1600 pixels > max_image_pixels=100)"), reason
    status, out = predict(tmp_path, f"ckpt_path={checkpoint}", inputs, "max_image_pixels=1600", name="fits")
    assert status == 0


def test_probabilities_equal_the_checkpoints_test_time_outputs(tmp_path, checkpoint, test_images):
    status, out = predict(
        tmp_path,
        f"ckpt_path={checkpoint}",
        f"inputs={test_images[0].parents[1]}",
        "top_k=5",  # more than the 3 classes: all 3 are listed, and the log says so
        "write_json=true",
    )
    assert status == 0
    assert not (out / "predict_errors.csv").exists()
    rows = json.loads((out / "predictions.json").read_text())
    assert {len(row["top_k"]) for row in rows} == {3}
    assert "top_k=5: the model has 3 classes; every one is listed" in (out / "predict.log").read_text()
    assert [row["path"] for row in rows] == [str(p) for p in test_images]
    expected = expected_probabilities(checkpoint, test_images)
    names = ["cat", "dog", "fox"]
    got = torch.tensor(
        [[next(t["probability"] for t in r["top_k"] if t["class"] == n) for n in names] for r in rows]
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_temperature_is_applied(checkpoint):
    """The checkpoint is calibrated (train calibrate=true): predict's probabilities are softmax(logits / T)."""
    model, card = load_inference_model(checkpoint)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["calibration"]["temperature"]
    assert card.temperature == pytest.approx(stored) and stored != pytest.approx(1.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images) * stored, model.head(model.backbone(images)))


def test_hflip_averages_the_image_and_its_mirror(checkpoint, test_images):
    _, card = load_inference_model(checkpoint)
    image = read_image(test_images[0])
    views = tta_views(card.prep, "hflip")(image)
    plain = tta_views(card.prep, "none")(image)
    assert views.shape[0] == 2
    torch.testing.assert_close(views[0], plain[0])
    torch.testing.assert_close(views[1], plain[0].flip(-1))
    crops = tta_views(card.prep, "five_crop")(image)
    assert crops.shape == (5, 3, card.prep.crop_size, card.prep.crop_size)


def test_tta_runs_end_to_end(tmp_path, checkpoint, test_images):
    for tta in ("hflip", "five_crop"):
        status, out = predict(
            tmp_path, f"ckpt_path={checkpoint}", f"inputs={test_images[0]}", f"tta={tta}", name=tta
        )
        assert status == 0
        rows = read_csv(out / "predictions.csv")
        assert len(rows) == 2 and 0 < float(rows[1][2]) <= 1


def test_hflip_is_refused_where_flipping_changes_the_class(checkpoint):
    _, card = load_inference_model(checkpoint)
    check_tta(card, "hflip", "x")
    with pytest.raises(ConfigError, match="tta=hflip: m.ckpt was trained with data.allow_hflip=false"):
        check_tta(replace(card, allow_hflip=False), "hflip", "m.ckpt")
    check_tta(replace(card, allow_hflip=False), "five_crop", "m.ckpt")


def test_inputs_a_glob_and_a_list_file(tmp_path, test_images):
    pattern = str(test_images[0].parents[1] / "*" / "0.png")
    assert collect_inputs(pattern) == [p for p in test_images if p.name == "0.png"]
    listing = tmp_path / "list.txt"
    shutil.copy(test_images[0], tmp_path / "here.png")
    listing.write_text(f"# new photos\nhere.png\n\n{test_images[1]}  # absolute\nmissing.png\n")
    assert collect_inputs(str(listing)) == [tmp_path / "here.png", test_images[1], tmp_path / "missing.png"]


def test_a_listed_file_that_is_missing_is_an_error_row(tmp_path, checkpoint, test_images):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{test_images[0]}\n{tmp_path / 'gone.png'}\n")
    status, out = predict(tmp_path, f"ckpt_path={checkpoint}", f"inputs={listing}")
    assert status == 2
    assert len(read_csv(out / "predictions.csv")) == 2
    assert read_csv(out / "predict_errors.csv")[1] == [str(tmp_path / "gone.png"), "no such file"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("{tmp}/nowhere", "inputs={tmp}/nowhere: no such file or folder"),
        ("{tmp}/empty", "inputs={tmp}/empty: the folder holds no image files"),
        ("{tmp}/*.jpeg", "inputs={tmp}/*.jpeg: the pattern matches no file"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, checkpoint, inputs, message):
    (tmp_path / "empty").mkdir()
    status, _ = predict(tmp_path, f"ckpt_path={checkpoint}", f"inputs={inputs.format(tmp=tmp_path)}")
    assert status == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().out


def test_bad_models_are_one_line_errors(tmp_path, capsys, test_images):
    not_ours = tmp_path / "weights.ckpt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, not_ours)
    lonely = tmp_path / "lonely" / "model.onnx"
    lonely.parent.mkdir()
    lonely.write_bytes(b"onnx")
    cases = {
        f"ckpt_path={not_ours}": "is a plain state_dict (weights only), not a checkpoint of a run",
        f"model_path={lonely}": f"model_path={lonely}: no model.json beside it",
        f"model_path={tmp_path / 'model.bin'}": "an exported model ends in .onnx or .pt",
    }
    for i, (model, message) in enumerate(cases.items()):
        status, _ = predict(tmp_path, model, f"inputs={test_images[0]}", name=f"bad{i}")
        assert status == 2
        assert message in capsys.readouterr().out


def test_one_model_source_exactly():
    with pytest.raises(ConfigError, match="give one of ckpt_path=<checkpoint> or model_path="):
        PredictConfig(inputs="x")
    with pytest.raises(ConfigError, match="give one of"):
        PredictConfig(inputs="x", ckpt_path="a", model_path="b")
    with pytest.raises(ConfigError, match="tta="):
        PredictConfig(inputs="x", ckpt_path="a", tta="ten_crop")


def test_a_misspelt_key_is_named_before_the_key_it_was_meant_for(tmp_path, capsys, checkpoint):
    assert (
        run_tool("predict", f"ckpt_path={checkpoint}", "+input=photos", f"hydra.run.dir={tmp_path / 'a'}")
        == 2
    )
    assert "input is not a key of predict.yaml; its keys are: " in "".join(capsys.readouterr())
    assert run_tool("predict", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'b'}") == 2
    assert "inputs must be set, e.g. inputs=..." in "".join(capsys.readouterr())
