"""Unpooled feature maps: each family's way from images to its last spatial map (or ViT's patch tokens),
as tokens (B, positions, channels), the input of the pooling heads (`head=gap`, `head=attention`).

Everything here is a module-level function of (module, images): the backbone keeps its own module tree
and parameter names (pretrained weights, stages, freezing and checkpoints are unchanged), and a copied
model runs its own module. torchvision's forward() always pools, so its families are spelled out; timm
models are built with `global_pool=''` and their own forward gives the map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from transferlab.backbones.registry import FeatureMap
from transferlab.errors import ConfigError


def to_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); tokens (B, N, C) as they are."""
    return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features


# --- torchvision: the modules each family's forward() runs before its pooling ------------------------


def _resnet_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = module.maxpool(module.relu(module.bn1(module.conv1(images))))
    x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
    return to_tokens(x)


def _features_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """VGG, AlexNet, MobileNetV2/V3, EfficientNet: everything in `features`."""
    return to_tokens(module.features(images))


def _densenet_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return to_tokens(F.relu(module.features(images)))


def _convnext_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`features`, then the classifier's LayerNorm2d, which normalises each position's channels."""
    return to_tokens(module.classifier[0](module.features(images)))


def _swin_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = module.norm(module.features(images))  # (B, H, W, C): Swin keeps channels last
    return x.flatten(1, 2)


def _regnet_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return to_tokens(module.trunk_output(module.stem(images)))


def _mnasnet_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return to_tokens(module.layers(images))


def _shufflenet_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = module.maxpool(module.conv1(images))
    return to_tokens(module.conv5(module.stage4(module.stage3(module.stage2(x)))))


def _vit_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """torchvision's ViT: its encoder's patch tokens (after the final LayerNorm), class token dropped."""
    x = module._process_input(images)
    x = torch.cat([module.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return module.encoder(x)[:, 1:]


# family (class name) -> (map function, the modules after the map that the map leaves unused: removed,
# so that no parameter goes without a gradient, which DDP refuses)
TORCHVISION_MAPS: dict[str, tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], tuple[str, ...]]] = {
    "ResNet": (_resnet_map, ()),
    "VGG": (_features_map, ("classifier",)),
    "AlexNet": (_features_map, ("classifier",)),
    "MobileNetV2": (_features_map, ("classifier",)),
    "MobileNetV3": (_features_map, ("classifier",)),
    "EfficientNet": (_features_map, ("classifier",)),
    "DenseNet": (_densenet_map, ()),
    "ConvNeXt": (_convnext_map, ()),
    "SwinTransformer": (_swin_map, ()),
    "RegNet": (_regnet_map, ()),
    "MNASNet": (_mnasnet_map, ("classifier",)),
    "ShuffleNetV2": (_shufflenet_map, ()),
    "VisionTransformer": (_vit_map, ()),
}


def check_torchvision_family(family: str) -> None:
    """A ConfigError naming `head` for a torchvision family (class name) whose map is not known."""
    if family not in TORCHVISION_MAPS:
        raise ConfigError(
            "head: the pooling heads (gap, attention) need a feature map, and transferlab does not know "
            f"that of torchvision's {family}; use head=linear or head=mlp, or a backbone of a family "
            f"it knows ({', '.join(sorted(TORCHVISION_MAPS))}) or from timm"
        )


def torchvision_map(module: nn.Module) -> tuple[FeatureMap, tuple[str, ...]]:
    """The family's map function and the modules it leaves unused; a ConfigError for other families."""
    check_torchvision_family(type(module).__name__)
    return TORCHVISION_MAPS[type(module).__name__]


# --- timm --------------------------------------------------------------------------------------------


def timm_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm model built with `global_pool=''`: its forward gives the map (after the head's norm or
    1x1 conv, where the model has one) or all tokens; prefix tokens (class, registers) are dropped."""
    x = module(images)
    if x.dim() == 3:
        return x[:, int(getattr(module, "num_prefix_tokens", 0)) :]
    if getattr(module, "output_fmt", "NCHW") == "NHWC":  # Swin-like models keep channels last
        return x.flatten(1, 2)
    return to_tokens(x)


# --- the channel count, measured --------------------------------------------------------------------


def probe_size(module: nn.Module) -> int:
    """An input size the model accepts: a ViT's fixed image size, else a small one."""
    size = getattr(module, "image_size", None)  # torchvision ViT
    patch_embed = getattr(module, "patch_embed", None)  # timm ViT-like
    if size is None and patch_embed is not None and getattr(patch_embed, "img_size", None):
        size = patch_embed.img_size[0]
    return int(size or 64)


@torch.no_grad()
def probe_tokens(module: nn.Module, feature_map: FeatureMap, size: int) -> torch.Tensor:
    """The tokens of one blank `size` image, in eval mode (batch norm of a 1x1 map in train mode would
    refuse it); the module's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        return feature_map(module, torch.zeros(1, 3, size, size))
    finally:
        module.train(was_training)


def map_channels(module: nn.Module, feature_map: FeatureMap) -> int:
    """Channels of the map, from one small image."""
    try:
        tokens = probe_tokens(module, feature_map, probe_size(module))
    except RuntimeError:  # a network too deep for 64 px (Inception-like stems)
        tokens = probe_tokens(module, feature_map, 224)
    return int(tokens.shape[-1])
