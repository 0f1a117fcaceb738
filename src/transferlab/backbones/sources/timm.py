"""timm models: built without their classifier, preprocessing from their pretrained config,
stages from timm's own `group_matcher` (the grouping its layer decay uses).

timm is optional and imported only inside the methods, so that a missing install is reported
as a ConfigError saying what to pip install.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from transferlab.backbones.feature_maps import map_channels, timm_map
from transferlab.backbones.registry import Backbone
from transferlab.backbones.stages import Groups, Stage, common_module, group_by_prefixes, to_stages, top_level
from transferlab.backbones.weights import offline_help
from transferlab.data.transforms import Preprocessing
from transferlab.downloads import offline, socket_timeout
from transferlab.errors import ConfigError, WeightsError


def _group_matcher_groups(module: nn.Module) -> Groups:
    from timm.models import group_parameters

    grouped = group_parameters(module, module.group_matcher(coarse=True))
    return [(common_module(names), list(names)) for _, names in sorted(grouped.items())]


def _classifier_prefix(module: nn.Module) -> str:
    classifier = module.pretrained_cfg.get("classifier", "fc")
    return classifier[0] if isinstance(classifier, list | tuple) else classifier


class TimmSource:
    """`backbone.source=timm`: any `timm.list_models()` name, with timm's default pretrained tag."""

    name = "timm"

    def check_available(self) -> None:
        try:
            import timm  # noqa: F401
        except ImportError:
            raise ConfigError("backbone.source=timm needs timm: pip install 'transferlab[timm]'") from None

    def check_name(self, model: str) -> None:
        self.check_available()
        import timm

        if not timm.is_model(model):
            close = timm.list_models(f"*{model.split('.')[0][:8]}*")[:20]
            hint = f" Similar names: {', '.join(close)}." if close else ""
            raise ConfigError(f"backbone.name={model!r} is not a timm model (see timm.list_models()).{hint}")

    def check_weights(self, model: str, weights: str) -> None:
        """Any name (`DEFAULT`, `pretrained`) means timm's default pretrained tag of `model`."""

    def check_feature_map(self, model: str) -> None:
        """Nearly every timm model builds without pooling; the few that cannot are refused by `build`."""

    def build(self, model: str, feature_map: bool = False) -> Backbone:
        import timm

        if not feature_map:
            module = timm.create_model(model, pretrained=False, num_classes=0)
            return Backbone(module, int(module.num_features), _classifier_prefix(module))
        try:  # no pooling: forward() gives the map (or tokens); the parameters are the same
            module = timm.create_model(model, pretrained=False, num_classes=0, global_pool="")
        except (AssertionError, ValueError, TypeError) as err:
            raise ConfigError(
                f"head: the pooling heads (gap, attention) need a feature map, and timm's {model} "
                f"cannot be built without its pooling ({err}); use head=linear or head=mlp"
            ) from None
        return Backbone(module, map_channels(module, timm_map), _classifier_prefix(module), timm_map)

    def preprocessing(self, model: str, weights: str | None) -> Preprocessing:
        self.check_name(model)
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        # the pretrained config the model would carry, read without building the model
        pretrained_cfg = get_pretrained_cfg(model)
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

    def pretrained_state(self, model: str, weights: str) -> dict[str, torch.Tensor]:
        """timm's default pretrained weights via the Hugging Face cache; never tried offline."""
        import timm

        hint = "pre-fill the Hugging Face cache (HF_HOME) on a machine with internet and set HF_HUB_OFFLINE=1, or"
        if offline():
            raise WeightsError(
                offline_help(f"timm weights for {model} need a download and TRANSFERLAB_OFFLINE=1.", hint)
            )
        try:
            with socket_timeout():
                module = timm.create_model(model, pretrained=True, num_classes=0)
        except Exception as err:  # timm/huggingface_hub raise many types for network failures
            raise WeightsError(
                offline_help(f"Could not load pretrained timm weights for {model}: {err}", hint)
            ) from err
        return module.state_dict()

    def stages(self, module: nn.Module) -> list[Stage]:
        """timm's `group_matcher`; a model without one falls back to its top-level children."""
        if hasattr(module, "group_matcher"):
            groups = _group_matcher_groups(module)
        else:
            groups = group_by_prefixes(module, top_level(module))
        return to_stages(groups, module)


SOURCE = TimmSource()
