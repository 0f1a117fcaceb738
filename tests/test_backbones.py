"""The backbone registry: every named backbone builds, drops its classifier, and carries preprocessing."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import get_model_weights

from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.models.backbones import build_backbone, preprocessing_for

NAMED = {  # config name -> (feature size, input size)
    "resnet18": (512, 32),
    "resnet50": (2048, 32),
    "vgg16": (4096, 32),
    "mobilenet_v3_large": (1280, 32),
    "efficientnet_b0": (1280, 32),
    "convnext_tiny": (768, 32),
    "vit_b_16": (768, 224),
}


@pytest.mark.parametrize(("name", "expected"), NAMED.items())
def test_named_backbones_output_pooled_features(name, expected):
    features, size = expected
    backbone = build_backbone("torchvision", name)
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
    prep = preprocessing_for("torchvision", name, weights.name)
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
    prep = preprocessing_for("timm", "test_resnet", "DEFAULT")
    assert prep.crop_size == 160 and prep.mean == (0.5, 0.5, 0.5)


def test_unknown_names_fail_with_choices():
    with pytest.raises(ConfigError, match="Valid names"):
        build_backbone("torchvision", "resnet5000")
    with pytest.raises(ConfigError, match="backbone.source='keras'.*torchvision, timm"):
        build_backbone("keras", "resnet50")
