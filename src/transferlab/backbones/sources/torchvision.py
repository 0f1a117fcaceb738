"""torchvision classification models, their weights enums and their stage layouts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
import torch.nn as nn
import torchvision
from torchvision.models import get_model, get_model_builder, get_model_weights, list_models

from transferlab.backbones.feature_maps import check_torchvision_family, map_channels, torchvision_map
from transferlab.backbones.registry import Backbone
from transferlab.backbones.stages import (
    Prefixes,
    Stage,
    children_with_params,
    group_by_prefixes,
    to_stages,
    top_level,
)
from transferlab.backbones.weights import is_weights_file, offline_help
from transferlab.data.transforms import Preprocessing
from transferlab.downloads import offline, socket_timeout
from transferlab.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

# torchvision models whose auxiliary classifiers would change the training-mode output type.
_MODEL_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@cache
def model_names() -> tuple[str, ...]:
    """torchvision's classification models (not detection or segmentation ones)."""
    return tuple(list_models(module=torchvision.models))


def resolve_weights(model: str, weights: str) -> Any:
    """The weights enum member of a name (`DEFAULT`, `IMAGENET1K_V2` or `ResNet50_Weights.IMAGENET1K_V2`)."""
    try:
        enum = get_model_weights(model)
    except (ValueError, KeyError):
        raise ConfigError(
            f"torchvision has no pretrained weights for backbone.name={model!r}; use backbone.weights=null or a file"
        ) from None
    tail = weights.split(".")[-1]
    if tail == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[tail]
    except KeyError:
        valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ConfigError(
            f"backbone.weights={weights!r} is not a weights name of {model}. Valid names: {valid}; "
            "or a path to a local weights file, or null for random initialisation."
        ) from None


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification layer: the last nn.Linear registered in the model."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no linear classification layer to replace; pick another backbone."
        )
    return linears[-1]


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


# Stage layouts of the torchvision families, as module paths per stage.


def _resnet(model: nn.Module) -> Prefixes:
    return [["conv1", "bn1"], *[[f"layer{i}"] for i in range(1, 5)]]


def _vgg(model: nn.Module) -> Prefixes:
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


def _features(model: nn.Module) -> Prefixes:
    """`features.0` (stem) ... `features.N`, then what sits between them and the removed classifier."""
    stages = [[path] for path in children_with_params(model.features, "features")]
    return stages + [[path] for path in children_with_params(model, "") if path != "features"]


def _paired_features(model: nn.Module) -> Prefixes:
    """ConvNeXt and Swin: stem, stage 1, then (downsampling, stage) pairs."""
    paths = children_with_params(model.features, "features")
    stages = [[paths[0]], [paths[1]], *[paths[i : i + 2] for i in range(2, len(paths), 2)]]
    return stages + [[path] for path in children_with_params(model, "") if path != "features"]


def _vision_transformer(model: nn.Module) -> Prefixes:
    blocks = [[f"encoder.layers.{name}"] for name, _ in model.encoder.layers.named_children()]
    return [["conv_proj", "class_token", "encoder.pos_embedding"], *blocks, ["encoder.ln"]]


def _regnet(model: nn.Module) -> Prefixes:
    return [["stem"], *[[path] for path in children_with_params(model.trunk_output, "trunk_output")]]


_FAMILIES: dict[str, Callable[[nn.Module], Prefixes]] = {
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


class TorchvisionSource:
    """`backbone.source=torchvision`: torchvision's classification models and weights enums."""

    name = "torchvision"

    def check_available(self) -> None:
        """torchvision is a dependency of transferlab: always available."""

    def check_name(self, model: str) -> None:
        if model not in model_names():
            raise ConfigError(
                f"backbone.name={model!r} is not a torchvision classification model. "
                f"Valid names: {', '.join(model_names())}"
            )

    def check_weights(self, model: str, weights: str) -> None:
        resolve_weights(model, weights)

    def check_feature_map(self, model: str) -> None:
        """By the family its builder returns (an annotation), without building the model."""
        family = get_model_builder(model).__annotations__.get("return")
        check_torchvision_family(getattr(family, "__name__", str(family)))

    def build(self, model: str, feature_map: bool = False) -> Backbone:
        module = get_model(model, weights=None, **_MODEL_KWARGS.get(model, {}))
        prefix, linear = _last_linear(module)
        _replace_module(module, prefix, nn.Identity())
        if not feature_map:
            return Backbone(module, linear.in_features, prefix)
        map_function, unused = torchvision_map(module)
        for path in unused:  # e.g. VGG's fully connected layers: pretrained weights for them are skipped
            _replace_module(module, path, nn.Identity())
        prefix = unused[0] if unused else prefix
        return Backbone(module, map_channels(module, map_function), prefix, map_function)

    def preprocessing(self, model: str, weights: str | None) -> Preprocessing:
        self.check_name(model)
        is_named = weights is not None and not is_weights_file(weights)
        try:
            enum_value = resolve_weights(model, weights if is_named else "DEFAULT")
        except ConfigError:
            if is_named:
                raise
            return Preprocessing()  # no published weights: ImageNet conventions
        tf = enum_value.transforms()
        return Preprocessing(
            crop_size=int(tf.crop_size[0]),
            resize_size=int(tf.resize_size[0]),
            mean=tuple(tf.mean),
            std=tuple(tf.std),
            interpolation=tf.interpolation.value,
        )

    def pretrained_state(self, model: str, weights: str) -> dict[str, torch.Tensor]:
        """From torch hub's cache (TORCH_HOME), else a download that fails within seconds."""
        resolved = resolve_weights(model, weights)
        filename = Path(resolved.url).name
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        hint = (
            f"download {resolved.url} on a machine with internet and copy it to {cached} "
            "(or set TORCH_HOME to a folder holding checkpoints/" + filename + "), or"
        )
        if not cached.is_file() and offline():
            raise WeightsError(
                offline_help(
                    f"{model} weights {resolved.name} are not cached and TRANSFERLAB_OFFLINE=1.", hint
                )
            )
        if not cached.is_file():
            log.info("Downloading %s weights %s to %s", model, resolved.name, cached)
        try:
            with socket_timeout():
                return resolved.get_state_dict(progress=False)
        except (URLError, OSError, TimeoutError) as err:
            raise WeightsError(
                offline_help(
                    f"Could not download {model} weights {resolved.name} from {resolved.url}: {err}", hint
                )
            ) from err

    def stages(self, module: nn.Module) -> list[Stage]:
        """By family (the module paths of each stage); other models by their top-level children."""
        family = _FAMILIES.get(type(module).__name__, top_level)
        return to_stages(group_by_prefixes(module, family(module)), module)


SOURCE = TorchvisionSource()
