"""The backbone registry: sources are discovered, every named backbone builds, drops its classifier,
carries preprocessing and splits into stages."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import get_model_weights

import transferlab.backbones.sources
from transferlab.backbones import (
    Backbone,
    BackboneSource,
    backbone_stages,
    build_backbone,
    get_source,
    source_names,
)
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError

NAMED = {  # config name -> (feature size, input size)
    "resnet18": (512, 32),
    "resnet50": (2048, 32),
    "vgg16": (4096, 32),
    "mobilenet_v3_large": (1280, 32),
    "efficientnet_b0": (1280, 32),
    "convnext_tiny": (768, 32),
    "vit_b_16": (768, 224),
}


@functools.cache
def built(source: str, name: str) -> Backbone:
    """Each architecture built once for the whole module: a random init of a large one takes seconds.
    Tests only read the modules (eval mode, no gradients)."""
    return build_backbone(source, name)


@pytest.mark.parametrize(("name", "expected"), NAMED.items())
def test_named_backbones_output_pooled_features(name, expected):
    features, size = expected
    backbone = built("torchvision", name)
    assert backbone.num_features == features
    backbone.module.eval()
    with torch.no_grad():
        out = backbone.module(torch.randn(1, 3, size, size))
    assert out.shape == (1, features)
    assert not any(k.startswith(backbone.classifier_prefix + ".") for k in backbone.module.state_dict())


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vit_b_16"])
def test_preprocessing_follows_the_weights(name):
    weights = get_model_weights(name).DEFAULT
    expected = weights.transforms()
    prep = get_source("torchvision").preprocessing(name, weights.name)
    assert prep.crop_size == expected.crop_size[0]
    assert prep.resize_size == expected.resize_size[0]
    assert list(prep.mean) == list(expected.mean) and list(prep.std) == list(expected.std)
    assert prep.interpolation == expected.interpolation.value


def test_image_size_override_keeps_the_resize_ratio():
    prep = Preprocessing(crop_size=224, resize_size=256).with_overrides(image_size=112)
    assert (prep.crop_size, prep.resize_size) == (112, 128)


def test_timm_backbone_and_its_preprocessing():
    pytest.importorskip("timm")
    backbone = build_backbone("timm", "test_resnet")
    with torch.no_grad():
        out = backbone.module.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, backbone.num_features)
    prep = get_source("timm").preprocessing("test_resnet", "DEFAULT")
    assert prep.crop_size == 160 and prep.mean == (0.5, 0.5, 0.5)


def test_unknown_names_fail_with_choices():
    with pytest.raises(ConfigError, match="Valid names"):
        build_backbone("torchvision", "resnet5000")
    with pytest.raises(ConfigError, match="backbone.source='keras'.*torchvision, timm"):
        build_backbone("keras", "resnet50")
    with pytest.raises(ConfigError, match="backbone.source='keras'.*torchvision, timm"):
        get_source("keras")


PROTOCOL_METHODS = (
    "check_available",
    "check_name",
    "check_weights",
    "check_feature_map",
    "build",
    "preprocessing",
    "pretrained_state",
    "stages",
)


def test_sources_are_the_modules_of_the_sources_package():
    folder = Path(transferlab.backbones.sources.__file__).parent
    present = {path.stem for path in folder.glob("*.py") if not path.stem.startswith("_")}
    assert set(source_names()) == present and {"torchvision", "timm"} <= present
    assert source_names()[0] == "torchvision"
    for name in source_names():
        source = get_source(name)
        assert source.name == name and isinstance(source, BackboneSource)
        assert all(callable(getattr(source, method)) for method in PROTOCOL_METHODS)


def test_a_new_source_module_is_discovered_without_other_edits(tmp_path, monkeypatch):
    (tmp_path / "toy.py").write_text(
        "import torch.nn as nn\n"
        "from transferlab.backbones import Backbone\n"
        "class Toy:\n"
        "    name = 'toy'\n"
        "    def check_available(self): pass\n"
        "    def check_name(self, model): pass\n"
        "    def build(self, model, feature_map=False):\n"
        "        return Backbone(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4, 'fc')\n"
        "SOURCE = Toy()\n"
    )
    package = transferlab.backbones.sources
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        assert "toy" in source_names()
        assert get_source("toy").name == "toy"
        assert build_backbone("toy", "anything").num_features == 4
    finally:
        sys.modules.pop(f"{package.__name__}.toy", None)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("torchvision", "resnet18"),
        ("torchvision", "vgg11"),
        ("torchvision", "mobilenet_v3_small"),
        ("torchvision", "efficientnet_b0"),
        ("torchvision", "convnext_tiny"),
        ("torchvision", "vit_b_16"),
        ("torchvision", "swin_t"),
        ("torchvision", "regnet_y_400mf"),
        ("torchvision", "densenet121"),
        ("timm", "test_resnet"),
        ("timm", "test_vit"),
        ("timm", "test_efficientnet"),
    ],
)
def test_stages_partition_every_family_in_order(source, name):
    if source == "timm":
        pytest.importorskip("timm")
    module = built(source, name).module
    stages = backbone_stages(module, source)
    owner = {param: i for i, stage in enumerate(stages) for param in stage.param_names}
    order = [owner[param] for param, _ in module.named_parameters()]
    assert len(owner) == len(order) == sum(len(s.param_names) for s in stages)  # each parameter once
    assert len(stages) >= 4, [s.name for s in stages]
    assert order == sorted(order)  # stem first, registration (= forward) order


def test_known_stage_layouts():
    names = [s.name for s in backbone_stages(built("torchvision", "resnet18").module, "torchvision")]
    assert names == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    vit = backbone_stages(built("torchvision", "vit_b_16").module, "torchvision")
    assert len(vit) == 1 + 12
    assert "encoder.ln.weight" in vit[-1].param_names  # the final norm joins the last block


def test_missing_timm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs timm: pip install 'transferlab\[timm\]'"):
        build_backbone("timm", "resnet18")


@pytest.mark.parametrize(
    ("setting", "weights", "expected"), [("auto", None, 0.1), (None, None, 0.01), (0.05, None, 0.05)]
)
def test_bn_momentum_from_scratch_is_pytorchs_default_unless_said_otherwise(setting, weights, expected):
    from transferlab.config import parse_group
    from transferlab.models.classifier import set_bn_momentum

    config = parse_group(
        "backbone", {"name": "mobilenet_v3_large", "weights": weights, "bn_momentum": setting}
    )
    net = torchvision.models.mobilenet_v3_large(num_classes=2)  # torchvision builds it with momentum 0.01
    set_bn_momentum(net, config.resolved_bn_momentum())
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {expected}
    pretrained = parse_group("backbone", {"name": "mobilenet_v3_large", "weights": "DEFAULT"})
    assert pretrained.resolved_bn_momentum() is None  # from pretrained weights: the architecture's own


def test_bad_bn_momentum_names_the_key():
    from transferlab.config import parse_group

    with pytest.raises(
        ConfigError, match=r"backbone.bn_momentum=2 must be auto, null or a number in \(0, 1\]"
    ):
        parse_group("backbone", {"name": "resnet18", "bn_momentum": 2})
