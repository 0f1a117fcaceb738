"""Grad-CAM (Selvaraju et al., 2017) of a backbone, with the library pytorch-grad-cam.

Grad-CAM weighs a layer's feature maps by the gradient of a class score and keeps the positive part:
where in the image the evidence for that class lies. The layer must still be spatial and late, so the
choice is per family: a CNN's last stage before the pooling (torchvision's layer4 / features /
trunk_output, timm's last `feature_info` stage or EfficientNet's head), a ViT's last block's first
norm (its patch tokens still map to places: pytorch-grad-cam's ViT tutorial), turned back into a
grid by `reshape` (prefix tokens dropped). Models not described here are `CamUnsupported`: the
report says so instead of showing a heat map of the wrong layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Reshape = Callable[[torch.Tensor], torch.Tensor]


class CamUnsupported(Exception):
    """No Grad-CAM for this model; the message says why (shown in the log and the report)."""


@dataclass(frozen=True)
class CamTarget:
    """The layer whose feature maps Grad-CAM weighs, and how its output becomes (N, C, H, W)."""

    layer: nn.Module
    name: str  # module path in the backbone, for the report
    reshape: Reshape


# torchvision CNNs: the module whose output is the last feature map before the global pooling
_TORCHVISION_CNN = {
    "ResNet": "layer4",
    "VGG": "features",
    "MobileNetV2": "features",
    "MobileNetV3": "features",
    "EfficientNet": "features",
    "DenseNet": "features",
    "ConvNeXt": "features",
    "RegNet": "trunk_output",
    "MNASNet": "layers",
    "ShuffleNetV2": "conv5",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
    "AlexNet": "features",
    "MaxVit": "blocks",
}
_TORCHVISION_NHWC = {"SwinTransformer": "features"}  # its stages keep channels last


def cam_target(backbone: nn.Module) -> CamTarget:
    """The Grad-CAM layer and reshape of `backbone` (a torchvision or timm model, classifier removed)."""
    kind, library = type(backbone).__name__, type(backbone).__module__.split(".")[0]
    if library == "torchvision":
        return _torchvision_target(backbone, kind)
    if library == "timm":
        return _timm_target(backbone, kind)
    raise CamUnsupported(
        f"{kind} (from {library}) is not a torchvision or timm model: no known Grad-CAM layer"
    )


def _torchvision_target(backbone: nn.Module, kind: str) -> CamTarget:
    if kind == "VisionTransformer":  # class token first, then a square grid of patches
        grid = backbone.image_size // backbone.patch_size
        return _at(
            backbone, f"{_last_child(backbone, 'encoder.layers')}.ln_1", tokens_to_grid(1, (grid, grid))
        )
    if kind in _TORCHVISION_NHWC:
        return _at(backbone, _TORCHVISION_NHWC[kind], channels_last_to_first)
    if kind in _TORCHVISION_CNN:
        return _at(backbone, _TORCHVISION_CNN[kind], feature_map)
    raise CamUnsupported(f"torchvision's {kind}: no Grad-CAM layer is known for this family")


def _timm_target(backbone: nn.Module, kind: str) -> CamTarget:
    blocks = getattr(backbone, "blocks", None)
    if hasattr(backbone, "patch_embed") and blocks is not None and hasattr(blocks[-1], "norm1"):
        # ViT, DeiT, BEiT, EVA: prefix tokens (class, distillation, registers), then the patch grid
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        grid = getattr(backbone.patch_embed, "grid_size", None)
        return _at(backbone, f"{_last_child(backbone, 'blocks')}.norm1", tokens_to_grid(prefix, grid))
    if kind == "EfficientNet" and hasattr(backbone, "bn2"):
        return _at(backbone, "bn2", feature_map)  # after conv_head: the map the pooling averages
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise CamUnsupported(f"timm's {kind} lists no feature stages (feature_info): no Grad-CAM layer known")
    nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"  # Swin-like stages keep channels last
    return _at(backbone, info[-1]["module"], channels_last_to_first if nhwc else feature_map)


def _last_child(backbone: nn.Module, path: str) -> str:
    """The path of the last block of a container (its children are named `0`, `1`, ... or otherwise)."""
    name = list(dict(backbone.get_submodule(path).named_children()))[-1]
    return f"{path}.{name}"


def _at(backbone: nn.Module, path: str, reshape: Reshape) -> CamTarget:
    return CamTarget(backbone.get_submodule(path), path, reshape)


def feature_map(output: torch.Tensor) -> torch.Tensor:
    """A CNN layer's output as it is, refused when it is not a (N, C, H, W) map."""
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CamUnsupported(f"the Grad-CAM layer's output is {shape}, not an (N, C, H, W) feature map")
    return output


def channels_last_to_first(output: torch.Tensor) -> torch.Tensor:
    return feature_map(output).permute(0, 3, 1, 2)


def tokens_to_grid(prefix: int, grid: tuple[int, int] | None) -> Reshape:
    """(N, prefix + H*W, C) tokens -> (N, C, H, W): the prefix tokens dropped, the patches on their grid
    (`grid`, or a square when the model was run at another size)."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise CamUnsupported(f"the Grad-CAM layer's output is {tuple(tokens.shape)}, not (N, tokens, C)")
        patches = tokens[:, prefix:, :]
        height, width = _grid_of(patches.shape[1], grid)
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _grid_of(count: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None and grid[0] * grid[1] == count:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(count)
    if side * side != count:
        raise CamUnsupported(f"{count} patch tokens do not form the patch grid {grid} nor a square")
    return side, side


@dataclass(frozen=True)
class HeatMaps:
    """Grad-CAM's maps at the images' size, and the size of the layer's own map they were scaled from."""

    maps: np.ndarray  # (N, H, W) in [0, 1]
    grid: tuple[int, int]  # 1 x 1: the layer has no spatial detail left at this image size


def grad_cam(model: nn.Module, target: CamTarget, images: torch.Tensor, classes: list[int]) -> HeatMaps:
    """Heat maps of `images`, each for its class in `classes`. `model` maps normalised images to logits;
    its parameters are set to need gradients (Grad-CAM's hooks see only outputs that do, and a frozen
    backbone's would not)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.requires_grad_(True)
    device = next(model.parameters()).device
    cam = GradCAM(model=model, target_layers=[target.layer], reshape_transform=target.reshape)
    try:  # not `with cam:` -- its __exit__ swallows IndexError, which must not pass unseen
        with torch.enable_grad():
            maps = cam(input_tensor=images.to(device), targets=[ClassifierOutputTarget(c) for c in classes])
        grid = tuple(cam.activations_and_grads.activations[0].shape[-2:])
    except (ValueError, IndexError, RuntimeError) as err:  # the library's own shape errors
        raise CamUnsupported(f"Grad-CAM failed on layer {target.name}: {err}") from err
    finally:
        cam.activations_and_grads.release()
    return HeatMaps(np.asarray(maps, dtype=np.float32), (int(grid[0]), int(grid[1])))


def overlay(image: np.ndarray, heat: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The heat map in the jet colours over the (H, W, 3) image in [0, 1]: uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32), heat, use_rgb=True, image_weight=image_weight)
