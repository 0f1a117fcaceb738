"""Backbones: images to pooled features, from any registered source (torchvision, timm, ...).

A backbone is always built with random initialisation; pretrained weights are loaded separately
(`load_pretrained`) so that restoring one of our checkpoints never tries to download anything.
"""

from __future__ import annotations

import torch.nn as nn

from transferlab.backbones.registry import (
    Backbone,
    BackboneSource,
    FeatureMap,
    get_source,
    run_backbone,
    source_names,
)
from transferlab.backbones.stages import Stage
from transferlab.backbones.weights import is_weights_file, load_pretrained, read_weights_file

__all__ = [
    "Backbone",
    "BackboneSource",
    "FeatureMap",
    "Stage",
    "backbone_stages",
    "build_backbone",
    "get_source",
    "is_weights_file",
    "load_pretrained",
    "read_weights_file",
    "run_backbone",
    "source_names",
]


def build_backbone(source: str, model: str, feature_map: bool = False) -> Backbone:
    """Architecture only, random init, after checking the name (the error lists the valid ones);
    `feature_map`: its forward is `Backbone.features`, the unpooled tokens (pooling heads)."""
    backbone_source = get_source(source)
    backbone_source.check_name(model)
    return backbone_source.build(model, feature_map)


def backbone_stages(module: nn.Module, source: str) -> list[Stage]:
    """The backbone's stages, stem first; every parameter is in exactly one stage."""
    return get_source(source).stages(module)
