"""Every backbone as an ordered list of stages, stem first: the unit of partial and gradual
freezing and of layer-wise learning-rate decay.

torchvision families are described by the module paths of their stages; timm models use timm's
own `group_matcher` (the grouping its layer decay uses); any other model falls back to its
top-level children. A stage holding only normalisation weights (ViT's final LayerNorm,
ConvNeXt's pre-logits norm) is merged into its neighbour: it is part of a stage, not one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from transferlab.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    param_names: tuple[str, ...]  # names in the backbone's named_parameters()


def _children_with_params(module: nn.Module, path: str) -> list[str]:
    prefix = f"{path}." if path else ""
    return [
        f"{prefix}{name}" for name, child in module.named_children() if any(True for _ in child.parameters())
    ]


def _resnet(model: nn.Module) -> list[list[str]]:
    return [["conv1", "bn1"], *[[f"layer{i}"] for i in range(1, 5)]]


def _vgg(model: nn.Module) -> list[list[str]]:
    """Conv blocks end at each max-pool; the two hidden fully connected layers form the last stage."""
    blocks, current = [], []
    for index, layer in enumerate(model.features):
        if any(True for _ in layer.parameters()):
            current.append(f"features.{index}")
        if isinstance(layer, nn.MaxPool2d) and current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return [*blocks, ["classifier"]]


def _features(model: nn.Module) -> list[list[str]]:
    """`features.0` (stem) ... `features.N`, then what sits between them and the removed classifier."""
    stages = [[path] for path in _children_with_params(model.features, "features")]
    return stages + [[path] for path in _children_with_params(model, "") if path != "features"]


def _paired_features(model: nn.Module) -> list[list[str]]:
    """ConvNeXt and Swin: stem, stage 1, then (downsampling, stage) pairs."""
    paths = _children_with_params(model.features, "features")
    stages = [[paths[0]], [paths[1]], *[paths[i : i + 2] for i in range(2, len(paths), 2)]]
    return stages + [[path] for path in _children_with_params(model, "") if path != "features"]


def _vision_transformer(model: nn.Module) -> list[list[str]]:
    blocks = [[f"encoder.layers.{name}"] for name, _ in model.encoder.layers.named_children()]
    return [["conv_proj", "class_token", "encoder.pos_embedding"], *blocks, ["encoder.ln"]]


def _regnet(model: nn.Module) -> list[list[str]]:
    return [["stem"], *[[path] for path in _children_with_params(model.trunk_output, "trunk_output")]]


def _top_level(model: nn.Module) -> list[list[str]]:
    """Fallback: each top-level child with parameters, the biggest Sequential split into its children
    when that is the only way to get several stages; the model's own parameters join the stem."""
    paths = _children_with_params(model, "")
    if len(paths) < 3 and paths:
        biggest = max(paths, key=lambda path: _count(model.get_submodule(path)))
        if isinstance(model.get_submodule(biggest), nn.Sequential | nn.ModuleList):
            at = paths.index(biggest)
            paths[at : at + 1] = _children_with_params(model.get_submodule(biggest), biggest)
    stages = [[path] for path in paths]
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own:
        stages = [own + stages[0], *stages[1:]] if stages else [own]
    return stages


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_TORCHVISION_FAMILIES: dict[str, Callable[[nn.Module], list[list[str]]]] = {
    "ResNet": _resnet,
    "VGG": _vgg,
    "MobileNetV2": _features,
    "MobileNetV3": _features,
    "EfficientNet": _features,
    "DenseNet": _features,
    "ConvNeXt": _paired_features,
    "SwinTransformer": _paired_features,
    "VisionTransformer": _vision_transformer,
    "RegNet": _regnet,
}

Groups = list[tuple[str, list[str]]]  # (label, parameter names) per stage


def _owner(param_name: str, prefixes: list[list[str]]) -> int | None:
    """Index of the stage holding the longest prefix of `param_name`."""
    best, best_len = None, -1
    for index, stage in enumerate(prefixes):
        for prefix in stage:
            if (param_name == prefix or param_name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _group_by_prefixes(model: nn.Module, prefixes: list[list[str]]) -> Groups:
    groups: list[list[str]] = [[] for _ in prefixes]
    for name, _ in model.named_parameters():
        owner = _owner(name, prefixes)
        if owner is None:
            raise ConfigError(
                f"transferlab cannot place parameter {name!r} of {type(model).__name__} in a stage; "
                "please report this backbone"
            )
        groups[owner].append(name)
    return [("+".join(stage), group) for stage, group in zip(prefixes, groups, strict=True) if group]


def _timm_groups(model: nn.Module) -> Groups:
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    return [(_common_module(names), list(names)) for _, names in sorted(grouped.items())]


def _common_module(param_names: list[str]) -> str:
    """The deepest module path all the parameters share, e.g. `blocks.3`, else their top-level names."""
    common: list[str] = []
    for column in zip(*(name.split(".")[:-1] for name in param_names), strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or "+".join(dict.fromkeys(name.split(".")[0] for name in param_names))


def _merge_norm_only(groups: Groups, model: nn.Module) -> Groups:
    """A group of only 1-d parameters (a norm layer) joins the stage before it, or the next one when
    it comes first."""
    params = dict(model.named_parameters())

    def norm_only(names: list[str]) -> bool:
        return all(params[name].ndim <= 1 for name in names)

    merged: Groups = []
    for label, names in groups:
        if merged and (norm_only(names) or (len(merged) == 1 and norm_only(merged[0][1]))):
            merged[-1] = (f"{merged[-1][0]}+{label}", merged[-1][1] + names)
        else:
            merged.append((label, names))
    return merged


def backbone_stages(model: nn.Module, source: str) -> list[Stage]:
    """The backbone's stages, stem first; every parameter is in exactly one stage."""
    if source == "timm" and hasattr(model, "group_matcher"):
        groups = _timm_groups(model)
    else:
        family = _TORCHVISION_FAMILIES.get(type(model).__name__, _top_level)
        groups = _group_by_prefixes(model, family(model))
    return [Stage(label, tuple(names)) for label, names in _merge_norm_only(groups, model)]
