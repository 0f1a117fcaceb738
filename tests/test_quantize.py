"""optimize method=quantize: an int8 ONNX model beside the fp32 export, whose top-1 agrees with fp32 on
most images of a small split, which predict runs, with its report; one-line errors for bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import onnx
import pytest
import torch

from tests.conftest import read_json, run_tool
from transferlab.errors import ConfigError

FILES = {"model.onnx", "model.int8.onnx", "model.json", "quantize.json"}


def optimize(out: Path, *overrides: str) -> int:
    return run_tool("optimize", *overrides, f"hydra.run.dir={out}")


def test_quantize_writes_the_int8_model_beside_the_fp32_one(quantized):
    assert {p.name for p in quantized.iterdir()} >= FILES
    assert not [p for p in quantized.iterdir() if p.name.startswith("quantize_")]  # its scratch folder
    graph = onnx.load(str(quantized / "model.int8.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, the default format
    card = read_json(quantized / "model.json")
    assert card["format"] == "onnx" and card["file"] == "model.int8.onnx"
    assert card["quantization"]["file"] == "model.int8.onnx"
    assert card["quantization"]["fp32_file"] == "model.onnx"
    assert card["quantization"]["calibration"] == {
        "split": "train",
        "batches": 2,
        "images": 16,  # 2 batches of the checkpoint's data.batch_size=8
        "transform": "the checkpoint's evaluation transform",
    }
    assert card["class_names"] == ["cat", "dog", "fox"]


def test_int8_agrees_with_fp32_and_the_report_measures_it(quantized):
    report = read_json(quantized / "quantize.json")
    assert report["split"] == "test" and report["images"] == 12  # the data's test split: 3 classes x 4
    # most images (9 of 12 here): the fixture's model is barely trained (3 epochs on 24 images), so its
    # logits are close and int8 rounding flips a few; a broken scale gives chance (1/3). The trained
    # models of experiments/compression agree on 98-99.7 % of the test images.
    assert report["top1_agreement"] > 0.5
    for name in ("fp32", "int8"):
        assert set(report[name]) >= {"test/acc", "test/precision", "test/recall", "test/f1", "size_bytes"}
        assert 0 <= report[name]["test/acc"] <= 1
        assert report[name]["latency_ms_batch1"] > 0 and report[name]["latency_ms_batch32"] > 0
    assert report["int8"]["size_bytes"] * 3 < report["fp32"]["size_bytes"]  # int8 weights: ~4x smaller
    assert abs(report["accuracy_change"]) <= 1 - report["top1_agreement"] + 1e-6
    assert report["fp32_parity"]["passed"] is True  # model.onnx is what export would write
    assert report["latency"]["intra_op_num_threads"] == 1 and report["latency"]["runs"] == 2


def test_predict_runs_the_int8_model(quantized, trained_run, tmp_path):
    images = trained_run.parent / "data" / "test"  # conftest.trained_run's data
    out = tmp_path / "predict"
    model = quantized / "model.int8.onnx"
    status = run_tool(
        "predict", f"model_path={model}", f"inputs={images}", "num_workers=0", f"hydra.run.dir={out}"
    )
    assert status == 0
    with (out / "predictions.csv").open() as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 12
    assert {row[1] for row in rows[1:]} <= {"cat", "dog", "fox"}
    assert all(0 <= float(row[2]) <= 1 for row in rows[1:])


def test_bad_input_is_a_one_line_error_before_any_work(tmp_path, capsys, checkpoint):
    not_ours = tmp_path / "weights.ckpt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, not_ours)
    cases = {
        (
            f"ckpt_path={checkpoint}",
            "method=sparsify",
        ): "method='sparsify' is not valid; choose one of: quantize, prune",
        (f"ckpt_path={checkpoint}", "quantize.calibration_batches=0"): (
            "quantize.calibration_batches=0 must be an integer >= 1"
        ),
        (f"ckpt_path={checkpoint}", "quantize.split=train"): "quantize.split='train' is not valid",
        (f"ckpt_path={checkpoint}", "quantize.format=int4"): "quantize.format='int4' is not valid",
        (f"ckpt_path={checkpoint}", "data.image_size=64"): "data.image_size is not read by optimize",
        (f"ckpt_path={not_ours}",): "is a plain state_dict (weights only), not a checkpoint of a run",
        ("method=quantize",): "ckpt_path must be set",
    }
    for i, (overrides, message) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        assert optimize(out, *overrides) == 2, overrides
        printed = capsys.readouterr().out
        assert message in printed and "Traceback" not in printed, (overrides, printed[-2000:])
        assert not list(out.glob("model*"))


def test_a_checkpoint_that_does_not_export_gets_exports_error(tmp_path, capsys, monkeypatch, checkpoint):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::frobnicate\n(a long explanation)")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    out = tmp_path / "out"
    assert optimize(out, f"ckpt_path={checkpoint}") == 2
    expected = (
        "backbone torchvision:resnet18 cannot be exported to format=onnx "
        "(RuntimeError: Unsupported operator aten::frobnicate)"
    )
    assert expected in capsys.readouterr().out
    assert not list(out.glob("model*.onnx"))


def test_the_first_layers_kept_in_fp32_are_the_stems_convolutions(quantized):
    from transferlab.compress.quantize import first_layers

    names = first_layers(quantized / "model.onnx", 2)
    nodes = {node.name: node for node in onnx.load(str(quantized / "model.onnx")).graph.node}
    assert len(names) == 2 and all(nodes[name].op_type == "Conv" for name in names)
    assert first_layers(quantized / "model.onnx", 0) == []
    layers = sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in nodes.values())
    assert len(first_layers(quantized / "model.onnx", layers - 1)) == layers - 1
    with pytest.raises(
        ConfigError, match=rf"fp32_first_layers={layers} leaves none of the model's {layers} "
    ):
        first_layers(quantized / "model.onnx", layers)  # an "int8" model all in fp32


def test_histogram_calibration_prints_nothing_to_stdout(quantized, tmp_path, capsys):
    """ONNX Runtime's percentile and entropy calibrators print their bin counts; the tool's own output is
    its log, so they go to the debug log instead."""
    import numpy as np

    from transferlab.compress.quantize import quantize_file
    from transferlab.config.schema import QuantizeConfig
    from transferlab.inference.model import ModelCard

    fp32_file = quantized / "model.onnx"
    card = ModelCard.read(fp32_file)
    size = card.prep.crop_size
    batches = [np.random.default_rng(i).random((4, 3, size, size), dtype=np.float32) for i in range(2)]
    int8_file = tmp_path / "model.int8.onnx"
    quantize_file(fp32_file, int8_file, batches, QuantizeConfig(calibration_method="percentile"), card)
    assert capsys.readouterr().out == ""
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(int8_file)).graph.node}
