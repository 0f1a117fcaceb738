"""optimize method=quantize: an int8 ONNX model beside the fp32 export, whose top-1 agrees with fp32 on
most images of a small split, which predict runs, with its report; one-line errors for bad input."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import read_json, run_tool
from transferlab.compress import timing
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
    assert report["latency"]["rounds"] == 3
    for batch in ("1", "32"):  # the speed-up: the median of the rounds' own
        assert len(report["speedup_rounds"][batch]) == 3
        assert report["speedup"][batch] == statistics.median(report["speedup_rounds"][batch])


def test_a_round_the_machines_load_changed_in_is_outvoted(monkeypatch):
    """A neighbour's work slowing int8 during the second round alone: that round's speed-up is off, the
    median of the rounds' is not; each model's latency is the median of its rounds' medians."""
    usual, slowed = [2.0, 1.0, 1.0, 2.0], [2.0, 3.0, 3.0, 2.0]  # ms per block: fp32, int8, int8, fp32
    blocks = iter([*usual, *slowed, *usual])
    block_ms = {}

    def fake_timed_ms(run, batch, runs):
        if len(batch) == 1:  # a block's first batch size: its time for this block
            block_ms["now"] = next(blocks)
        return [block_ms["now"]] * runs

    monkeypatch.setattr(timing, "timed_ms", fake_timed_ms)
    medians = timing.medians_in_rounds(lambda name: None, ["fp32", "int8"], np.zeros((32, 1)), 4, rounds=3)
    assert medians["int8"][1] == [1.0, 3.0, 1.0]
    assert timing.round_speedups(medians, "fp32", "int8")[32] == [2.0, 2 / 3, 2.0]
    assert timing.speedup_over_rounds(medians, "fp32", "int8") == {1: 2.0, 32: 2.0}
    assert timing.median_over_rounds(medians) == {"fp32": {1: 2.0, 32: 2.0}, "int8": {1: 1.0, 32: 1.0}}


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


def test_histogram_calibration_prints_nothing_to_stdout(quantized, tmp_path, capsys, caplog, monkeypatch):
    """ONNX Runtime's percentile and entropy calibrators print their bin counts; the tool's own output is
    its log, so they go to the debug log instead. Its quantizer's step notes on the root logger (one per
    layer whose weight scale it widens; the 224 px Lite0 of experiments/compression has ten) stay out."""
    import logging

    import onnxruntime.quantization

    from transferlab.compress.quantize import quantize_file

    real_quantize_static = onnxruntime.quantization.quantize_static

    def noting_quantize_static(*args, **kwargs):  # such a note, wherever the tiny model gives none
        logging.info("Increased scale[0] for weight `w` by ratio 2.0 to ensure bias input `b` ...")
        logging.getLogger("transferlab.compress").info("a named logger's line")  # kept
        return real_quantize_static(*args, **kwargs)

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", noting_quantize_static)
    caplog.set_level(logging.INFO)
    from transferlab.config.schema import QuantizeConfig
    from transferlab.inference.model import ModelCard

    fp32_file = quantized / "model.onnx"
    card = ModelCard.read(fp32_file)
    size = card.prep.crop_size
    batches = [np.random.default_rng(i).random((4, 3, size, size), dtype=np.float32) for i in range(2)]
    int8_file = tmp_path / "model.int8.onnx"
    quantize_file(fp32_file, int8_file, batches, QuantizeConfig(calibration_method="percentile"), card)
    assert capsys.readouterr().out == ""
    messages = [record.getMessage() for record in caplog.records]
    assert "a named logger's line" in messages and not [m for m in messages if "Increased scale" in m]
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(int8_file)).graph.node}
