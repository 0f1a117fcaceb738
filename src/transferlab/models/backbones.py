"""Backbone registry: torchvision and timm classifiers with their classification layer removed.

A backbone maps a batch of images to pooled features. It is always built with random
initialisation; pretrained weights are loaded separately (see `weights.py`) so that restoring
one of our checkpoints never tries to download anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch.nn as nn
import torchvision
from torchvision.models import get_model, get_model_weights, list_models

from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError

SOURCES = ("torchvision", "timm")

# torchvision models whose auxiliary classifiers would change the training-mode output type.
_TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@dataclass
class Backbone:
    module: nn.Module  # images (B, 3, H, W) -> features (B, num_features)
    num_features: int
    classifier_prefix: str  # state-dict prefix of the removed classification layer, e.g. "fc"


@cache
def torchvision_model_names() -> tuple[str, ...]:
    return tuple(list_models(module=torchvision.models))


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ConfigError(f"backbone.source={source!r} is not valid; choose one of: {', '.join(SOURCES)}")


def check_backbone_name(source: str, name: str) -> None:
    """Fail early, listing the valid names, when `backbone.name` does not exist."""
    _check_source(source)
    if source == "torchvision":
        if name not in torchvision_model_names():
            raise ConfigError(
                f"backbone.name={name!r} is not a torchvision classification model. "
                f"Valid names: {', '.join(torchvision_model_names())}"
            )
        return
    if not timm_available():
        raise ConfigError("backbone.source=timm needs timm: pip install 'transferlab[timm]'")
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:20]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ConfigError(f"backbone.name={name!r} is not a timm model (see timm.list_models()).{hint}")


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


def build_backbone(source: str, name: str) -> Backbone:
    """Architecture only, random init; the classification layer is replaced by nn.Identity."""
    check_backbone_name(source, name)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0)
        classifier = model.pretrained_cfg.get("classifier", "fc")
        prefix = classifier[0] if isinstance(classifier, list | tuple) else classifier
        return Backbone(model, int(model.num_features), prefix)
    model = get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))
    prefix, linear = _last_linear(model)
    _replace_module(model, prefix, nn.Identity())
    return Backbone(model, linear.in_features, prefix)


def torchvision_weights(name: str, weights: str):
    """Resolve a weights name (`DEFAULT`, `IMAGENET1K_V2` or `ResNet50_Weights.IMAGENET1K_V2`)."""
    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(
            f"torchvision has no pretrained weights for backbone.name={name!r}; use backbone.weights=null or a file"
        ) from None
    tail = weights.split(".")[-1]
    if tail == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[tail]
    except KeyError:
        valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ConfigError(
            f"backbone.weights={weights!r} is not a weights name of {name}. Valid names: {valid}; "
            "or a path to a local weights file, or null for random initialisation."
        ) from None


def preprocessing_for(source: str, name: str, weights: str | None) -> Preprocessing:
    """What the chosen weights expect; for random init or a local file, the architecture's default weights."""
    check_backbone_name(source, name)
    if source == "timm":
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        # the pretrained config the model would carry, read without building the model
        pretrained_cfg = get_pretrained_cfg(name)
        if pretrained_cfg is None:
            return Preprocessing()  # no published config: ImageNet conventions
        config = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
        crop = int(config["input_size"][-1])
        return Preprocessing(
            crop_size=crop,
            resize_size=round(crop / config.get("crop_pct", 0.875)),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation=config.get("interpolation", "bilinear"),
        )
    is_named = weights is not None and not is_weights_file(weights)
    try:
        enum_value = torchvision_weights(name, weights if is_named else "DEFAULT")
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


def is_weights_file(weights: str) -> bool:
    """`backbone.weights` names a file (existing or not), not a weights name like IMAGENET1K_V2."""
    suffixes = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
    looks_like_path = "/" in weights or "\\" in weights or weights.endswith(suffixes)
    return looks_like_path or Path(weights).expanduser().is_file()
