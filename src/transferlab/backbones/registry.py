"""Backbone sources, discovered: each module of `transferlab.backbones.sources` is one source.

A source (torchvision, timm, ...) knows its model names, builds an architecture with its
classification layer removed, says what preprocessing its weights expect, fetches its named
weights and splits a model into stages. Adding a source means adding one module that defines
`SOURCE = <instance>`; nothing here lists them, so nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn as nn

from transferlab.errors import ConfigError

if TYPE_CHECKING:
    from transferlab.backbones.stages import Stage
    from transferlab.data.transforms import Preprocessing

SOURCES_PACKAGE = "transferlab.backbones.sources"
# Listed first in choices and errors: the default source (no extra install), then the one that takes
# any timm model name; the rest follow sorted.
_LEADING = ("torchvision", "timm")


# (backbone module, images (B, 3, H, W)) -> tokens (B, positions, channels): the unpooled feature map, a
# CNN's spatial positions or a ViT's patch tokens. A module-level function, never a closure or bound
# method, so that a copied model (deepcopy: weight averaging, distillation) runs its own module.
FeatureMap = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class Backbone:
    module: nn.Module  # images (B, 3, H, W) -> pooled features (B, num_features)
    num_features: int  # channels of the pooled features, or of the tokens when feature_map is set
    classifier_prefix: str  # state-dict prefix of the removed classification layer(s), e.g. "fc"
    # built with feature_map=True: how to run `module` to its unpooled map (pooling heads: head=gap, ...)
    feature_map: FeatureMap | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features, or tokens (B, positions, channels) when built for a feature map."""
        return run_backbone(self.module, self.feature_map, images)


def run_backbone(module: nn.Module, feature_map: FeatureMap | None, images: torch.Tensor) -> torch.Tensor:
    """What a head takes from `module`: its own (pooled) output, or `feature_map`'s tokens."""
    return feature_map(module, images) if feature_map else module(images)


@runtime_checkable
class BackboneSource(Protocol):
    """What a source of backbones provides; `name` is the value of `backbone.source`."""

    name: str

    def check_available(self) -> None:
        """ConfigError saying what to pip install when the source's library is missing."""
        ...

    def check_name(self, model: str) -> None:
        """ConfigError naming `backbone.name` and listing valid or similar names."""
        ...

    def check_weights(self, model: str, weights: str) -> None:
        """ConfigError listing the valid names when `weights` (a name, not a file) is not one of `model`'s."""
        ...

    def check_feature_map(self, model: str) -> None:
        """ConfigError naming `head` when `build(model, feature_map=True)` is known to fail."""
        ...

    def build(self, model: str, feature_map: bool = False) -> Backbone:
        """Architecture only, random init, the classification layer replaced by nn.Identity; with
        `feature_map`, also the layers after the last spatial map, and `Backbone.feature_map` set
        (a ConfigError naming `head` when the architecture has no spatial map transferlab knows)."""
        ...

    def preprocessing(self, model: str, weights: str | None) -> Preprocessing:
        """What `weights` expect; for random init or a local file, the architecture's default weights;
        ImageNet conventions when none are published."""
        ...

    def pretrained_state(self, model: str, weights: str) -> dict[str, torch.Tensor]:
        """The named weights' state_dict, from the cache or a download that fails fast offline."""
        ...

    def stages(self, module: nn.Module) -> list[Stage]:
        """The built module's stages, stem first; every parameter in exactly one stage."""
        ...


def source_names() -> tuple[str, ...]:
    """The sources present, listed without importing them (and so without their libraries)."""
    package = importlib.import_module(SOURCES_PACKAGE)
    names = sorted(
        info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")
    )
    rank = {name: i for i, name in enumerate(_LEADING)}
    return tuple(sorted(names, key=lambda name: rank.get(name, len(rank))))  # stable: the rest stay sorted


def get_source(name: str) -> BackboneSource:
    """The source named by `backbone.source`; its module is imported only now."""
    names = source_names()
    if name not in names:
        raise ConfigError(f"backbone.source={name!r} is not valid; choose one of: {', '.join(names)}")
    module = importlib.import_module(f"{SOURCES_PACKAGE}.{name}")
    source = getattr(module, "SOURCE", None)
    if source is None or getattr(source, "name", None) != name:
        raise TypeError(
            f"{module.__name__} must define SOURCE, a BackboneSource whose name is {name!r}; got {source!r}"
        )
    return source
