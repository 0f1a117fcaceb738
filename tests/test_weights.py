"""Loading weights: local files of every kind, the torch hub cache, and a fast, clear offline failure."""

from __future__ import annotations

import argparse
import time
from urllib.error import URLError

import pytest
import torch
from torchvision.models import ResNet18_Weights, get_model

from transferlab.backbones import build_backbone, load_pretrained, read_weights_file
from transferlab.backbones.weights import load_backbone_state
from transferlab.errors import WeightsError


def assert_backbone_equals(backbone, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    loaded = backbone.module.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[prefix + key]), key


def test_local_torchvision_state_dict_loads_exactly(tmp_path, caplog):
    source = get_model("resnet18", weights=None)  # random weights, 1000-class fc as torchvision saves
    path = tmp_path / "my_resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("torchvision", "resnet18")
    with caplog.at_level("INFO"):
        load_pretrained(backbone, "torchvision", "resnet18", str(path))
    assert_backbone_equals(backbone, source.state_dict())
    assert "Skipped 2 tensors outside the backbone" in caplog.text and "fc.weight" in caplog.text


def test_checkpoint_wrappers_and_ddp_prefix_are_unwrapped(tmp_path):
    source = get_model("resnet18", weights=None).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    backbone = build_backbone("torchvision", "resnet18")
    load_pretrained(backbone, "torchvision", "resnet18", str(path))
    assert_backbone_equals(backbone, source)


def test_vgg_classifier_keeps_its_hidden_layers():
    backbone = build_backbone("torchvision", "vgg11")  # one VGG: a random init of one takes seconds
    # a state_dict as torchvision's VGG has it: the backbone's tensors (other values than its own) and
    # classifier.6; loaded as from a file, without writing half a gigabyte (files: the tests above)
    source = {k: v + 1 if v.is_floating_point() else v for k, v in backbone.module.state_dict().items()}
    source |= {"classifier.6.weight": torch.zeros(1000, 4096), "classifier.6.bias": torch.zeros(1000)}
    load_backbone_state(backbone, source, origin="vgg11 state_dict")
    assert_backbone_equals(
        backbone, source
    )  # classifier.0/3 (the 4096-d layers) loaded, classifier.6 skipped


def test_wrong_architecture_is_an_error_listing_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(get_model("resnet34", weights=None).state_dict(), path)
    backbone = build_backbone("torchvision", "resnet18")
    with pytest.raises(WeightsError, match=r"(?s)does not fit.*unexpected: layer1\.2"):
        load_pretrained(backbone, "torchvision", "resnet18", str(path))


def test_shape_mismatch_is_reported(tmp_path):
    state = get_model("resnet18", weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    path = tmp_path / "gray.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"(?s)shape mismatch: conv1.weight: file \(64, 1, 7, 7\)"):
        load_pretrained(build_backbone("torchvision", "resnet18"), "torchvision", "resnet18", str(path))


def test_unsafe_pickle_needs_opt_in(tmp_path):
    state = get_model("resnet18", weights=None).state_dict()
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)  # like timm's train.py
    with pytest.raises(WeightsError, match=r"holds argparse.Namespace, .* add backbone.trust_file=true"):
        read_weights_file(path)
    assert set(read_weights_file(path, trust_file=True)) == set(state)


def test_a_file_that_is_no_weights_file_is_named_for_what_it_is(tmp_path):
    """An ONNX file or an empty one is not offered backbone.trust_file=true, which could not help."""
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch")  # how an ONNX protobuf starts
    with pytest.raises(
        WeightsError, match=r"is not a PyTorch file .*give a state_dict or checkpoint"
    ) as raised:
        read_weights_file(onnx_file)
    assert "trust_file" not in str(raised.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"backbone.weights=.*empty.pth is empty \(0 bytes\)"):
        read_weights_file(empty)


def test_a_torchscript_models_weights_are_taken_when_trusted(tmp_path):
    """torch.jit.load, not torch's safe loader, reads it: refused until trusted, then its weights load
    (an exported model of ours: backbone.* and head.*, the head's skipped as any classifier's)."""
    model = get_model("resnet18", weights=None).eval()
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    with pytest.raises(
        WeightsError, match=r"is a TorchScript model; to take its weights, add backbone.trust_file"
    ):
        read_weights_file(path)
    state = read_weights_file(path, trust_file=True)
    assert set(state) == set(model.state_dict()) and torch.equal(state["fc.weight"], model.fc.weight)
    backbone = build_backbone("torchvision", "resnet18")
    load_pretrained(backbone, "torchvision", "resnet18", str(path), trust_file=True)
    assert torch.equal(backbone.module.conv1.weight, model.conv1.weight)


def test_weights_that_diverged_are_refused(tmp_path):
    state = get_model("resnet18", weights=None).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"holds NaN or infinite values \(layer1.0.conv1.weight\)"):
        load_pretrained(build_backbone("torchvision", "resnet18"), "torchvision", "resnet18", str(path))


def test_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = get_model("resnet18", weights=None).state_dict()
    path = tmp_path / "r18.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    backbone = build_backbone("torchvision", "resnet18")
    load_pretrained(backbone, "torchvision", "resnet18", str(path))
    assert_backbone_equals(backbone, source)


def test_timm_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("test_resnet", pretrained=False).state_dict()  # with its classifier
    path = tmp_path / "timm.pth"
    torch.save(source, path)
    backbone = build_backbone("timm", "test_resnet")
    load_pretrained(backbone, "timm", "test_resnet", str(path))
    assert_backbone_equals(backbone, source)


def test_cached_torchvision_weights_load_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = get_model("resnet18", weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    cache.parent.mkdir(parents=True)
    torch.save(source, cache)
    backbone = build_backbone("torchvision", "resnet18")
    load_pretrained(backbone, "torchvision", "resnet18", "IMAGENET1K_V1")  # TRANSFERLAB_OFFLINE=1 in tests
    assert_backbone_equals(backbone, source)


def test_offline_mode_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        load_pretrained(build_backbone("torchvision", "resnet50"), "torchvision", "resnet50", "DEFAULT")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "IMAGENET1K_V2" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "backbone.weights=/path/to/weights.pth" in message and "backbone.weights=null" in message


def test_failed_download_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "0")

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    start = time.monotonic()
    with pytest.raises(
        WeightsError, match="(?s)Could not download resnet18 weights IMAGENET1K_V1.*To run offline"
    ):
        load_pretrained(build_backbone("torchvision", "resnet18"), "torchvision", "resnet18", "IMAGENET1K_V1")
    assert time.monotonic() - start < 5


def test_random_init_is_said_loudly(caplog):
    with caplog.at_level("WARNING"):
        load_pretrained(build_backbone("torchvision", "resnet18"), "torchvision", "resnet18", None)
    assert "RANDOM weights" in caplog.text
