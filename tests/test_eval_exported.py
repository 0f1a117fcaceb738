"""eval.py model_path=: an exported (fp32 ONNX, TorchScript) or quantized (int8 ONNX) model tested on its
source checkpoint's split, with the metrics eval ckpt_path= and quantize.json give; one-line refusals.
The models are conftest's session fixtures (`quantized`: model.onnx and model.int8.onnx)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import read_json, run_tool

DESCRIPTION = {"ckpt_path", "model_path", "model_format", "quantization", "split", "split_source"}


def evaluate(out: Path, *overrides: str) -> int:
    return run_tool("eval", *overrides, f"hydra.run.dir={out}")


@pytest.fixture(scope="module")
def ckpt_metrics(checkpoint, tmp_path_factory) -> dict:
    """eval ckpt_path= of the checkpoint the quantized models come from: the reference."""
    out = tmp_path_factory.mktemp("eval_ckpt") / "run"
    assert evaluate(out, f"ckpt_path={checkpoint}", "split=test", "trainer.accelerator=cpu") == 0
    return read_json(out / "metrics.json")


def test_the_fp32_export_scores_as_its_checkpoint(quantized, ckpt_metrics, checkpoint, tmp_path):
    model = quantized / "model.onnx"  # export's fp32 model, parity-checked (quantize's reference)
    assert evaluate(tmp_path, f"model_path={model}", "split=test") == 0
    metrics = read_json(tmp_path / "metrics.json")
    assert set(metrics) == set(ckpt_metrics) and set(metrics) >= DESCRIPTION
    assert metrics["test/acc"] == ckpt_metrics["test/acc"]
    assert metrics["test/loss"] == pytest.approx(ckpt_metrics["test/loss"], abs=1e-4)
    assert metrics["test/confusion_matrix"] == ckpt_metrics["test/confusion_matrix"]
    for key in ("test/f1", "test/precision", "test/recall", "test/acc_class/fox"):
        assert metrics[key] == pytest.approx(ckpt_metrics[key], abs=1e-6), key
    same = ("ckpt_path", "split", "split_source", "class_names", "preprocessing")
    assert {key: metrics[key] for key in same} == {key: ckpt_metrics[key] for key in same}
    assert metrics["ckpt_path"] == str(checkpoint.resolve())
    assert (metrics["model_path"], metrics["model_format"]) == (str(model.resolve()), "onnx")
    assert metrics["quantization"] is None  # model.onnx is the fp32 one, though model.json is the int8's
    assert (ckpt_metrics["model_path"], ckpt_metrics["model_format"]) == (None, "checkpoint")
    evaluated = (tmp_path / "splits" / "test.txt").read_text()
    assert evaluated == (checkpoint.parent.parent / "splits" / "test.txt").read_text()


def test_the_int8_model_scores_as_quantize_measured_it(quantized, tmp_path):
    model = quantized / "model.int8.onnx"
    assert evaluate(tmp_path, f"model_path={model}") == 0  # split=test, eval's default
    metrics = read_json(tmp_path / "metrics.json")
    int8 = read_json(quantized / "quantize.json")["int8"]
    for key in ("test/acc", "test/f1", "test/precision", "test/recall"):
        assert metrics[key] == pytest.approx(int8[key], abs=1e-6), key
    assert metrics["test/loss"] > 0 and sum(map(sum, metrics["test/confusion_matrix"])) == 12
    assert metrics["model_format"] == "onnx" and metrics["quantization"]["format"] == "qdq"


def test_a_torchscript_export_scores_as_its_checkpoint(checkpoint, ckpt_metrics, tmp_path):
    export = ("export", f"ckpt_path={checkpoint}", "format=torchscript", "parity_images=8")
    assert run_tool(*export, f"hydra.run.dir={tmp_path / 'export'}") == 0
    model = tmp_path / "export" / "model.pt"
    assert evaluate(tmp_path / "eval", f"model_path={model}", "trainer.accelerator=cpu") == 0
    metrics = read_json(tmp_path / "eval" / "metrics.json")
    assert (metrics["model_format"], metrics["quantization"]) == ("torchscript", None)
    assert metrics["test/acc"] == ckpt_metrics["test/acc"]
    assert metrics["test/loss"] == pytest.approx(ckpt_metrics["test/loss"], abs=1e-4)


def copy_export(quantized: Path, folder: Path, **card_changes: object) -> Path:
    """The int8 model (linked) in `folder` with a copy of its model.json, `card_changes` applied."""
    folder.mkdir(parents=True)
    model = folder / "model.int8.onnx"
    os.symlink(quantized / "model.int8.onnx", model)
    card = read_json(quantized / "model.json")
    card["source_checkpoint"].update(card_changes)
    (folder / "model.json").write_text(json.dumps(card))
    return model


def test_bad_input_is_refused_in_one_line_before_any_data_is_read(quantized, checkpoint, tmp_path, capsys):
    model = quantized / "model.int8.onnx"
    lonely = tmp_path / "lonely" / "model.int8.onnx"
    lonely.parent.mkdir()
    os.symlink(model, lonely)
    moved = copy_export(quantized, tmp_path / "moved", path=str(tmp_path / "gone" / "best.ckpt"))
    replaced = copy_export(quantized, tmp_path / "replaced", sha256="0" * 64)
    one_of = "give one of ckpt_path=<checkpoint> or model_path=<exported model file>"
    cases = {
        (f"ckpt_path={checkpoint}", f"model_path={model}"): f"{one_of} (got both)",
        ("split=test",): f"{one_of} (got neither)",
        (f"model_path={tmp_path / 'none.onnx'}",): f"model_path={tmp_path / 'none.onnx'}: no such file",
        (f"model_path={lonely}",): f"model_path={lonely}: no model.json beside it",
        (f"model_path={moved}",): f"the checkpoint it was exported from, {tmp_path / 'gone' / 'best.ckpt'}",
        (f"model_path={replaced}",): f"model_path={replaced} was not exported from {checkpoint.resolve()}",
        (f"model_path={model}", "data.image_size=64"): "data.image_size is not read by eval with model_path=",
    }
    if not torch.cuda.is_available():  # eval's own key is named, not predict's device=
        cases[(f"model_path={model}", "trainer.accelerator=gpu")] = "use trainer.accelerator=cpu or auto"
    for i, (overrides, message) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        assert evaluate(out, *overrides) == 2, overrides
        printed = capsys.readouterr().out
        assert message in printed and "Traceback" not in printed, (overrides, printed[-2000:])
        assert not (out / "metrics.json").exists() and not (out / "splits").exists()


def test_a_card_from_another_model_is_refused_not_used_for_the_labels(
    quantized, trained_run, tmp_path, capsys
):
    """A model.json beside a file of another export (here it lists 4 classes for a 3-class model): predict
    and eval stop at the first batch, instead of naming predictions with the wrong classes."""
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(quantized / "model.onnx", folder / "model.onnx")
    card = read_json(quantized / "model.json")
    card.update(file="model.onnx", quantization=None, class_names=[*card["class_names"], "owl"])
    (folder / "model.json").write_text(json.dumps(card))
    images = trained_run.parent / "data" / "test"  # conftest.trained_run's data
    expected = (
        f"model_path={folder / 'model.onnx'} gives 3 scores per image, but the model.json beside it lists 4"
    )
    status = run_tool(
        "predict",
        f"model_path={folder / 'model.onnx'}",
        f"inputs={images}",
        f"hydra.run.dir={tmp_path / 'p'}",
    )
    assert status == 2 and expected in capsys.readouterr().out
    assert not (tmp_path / "p" / "predictions.csv").exists()
    status = run_tool("eval", f"model_path={folder / 'model.onnx'}", f"hydra.run.dir={tmp_path / 'e'}")
    assert status == 2 and expected in capsys.readouterr().out
