"""Load pretrained weights into a backbone: torchvision weights, timm weights or a local file.

`backbone.weights` is one of
- a torchvision weights name (`DEFAULT`, `IMAGENET1K_V2`, ...) or, for timm, `DEFAULT`/`pretrained`;
- a local file: a state_dict, a torchvision/timm checkpoint, or a Lightning `.ckpt` of ours;
- null: random initialisation (logged as a warning).
Weights of the removed classification layer are skipped and reported; any other missing or
unexpected key is an error. Downloads that cannot happen fail within seconds, saying how to
proceed offline; set TRANSFERLAB_OFFLINE=1 to never try.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.error import URLError

import torch

from transferlab.downloads import offline, socket_timeout
from transferlab.errors import WeightsError
from transferlab.models.backbones import Backbone, is_weights_file, torchvision_weights

log = logging.getLogger(__name__)

_OUR_BACKBONE_PREFIX = "backbone."


def load_pretrained(
    backbone: Backbone, source: str, name: str, weights: str | None, trust_file: bool = False
) -> None:
    """Fill `backbone` in place according to `backbone.weights`."""
    if weights is None:
        log.warning("backbone.weights=null: %s starts from RANDOM weights (no transfer learning).", name)
        return
    if is_weights_file(weights):
        state = read_weights_file(weights, trust_file)
        load_backbone_state(backbone, state, origin=weights)
        return
    state = _timm_state(name) if source == "timm" else _torchvision_state(name, weights)
    load_backbone_state(backbone, state, origin=f"{source}:{name}:{weights}")


def _offline_help(what: str, cache_hint: str) -> str:
    return (
        f"{what}\nTo run offline, either\n"
        f"  - {cache_hint}\n"
        "  - pass a local file: backbone.weights=/path/to/weights.pth (state_dict or checkpoint), or\n"
        "  - train from scratch: backbone.weights=null"
    )


def _torchvision_state(name: str, weights_name: str) -> dict[str, torch.Tensor]:
    weights = torchvision_weights(name, weights_name)
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    hint = (
        f"download {weights.url} on a machine with internet and copy it to {cached} "
        "(or set TORCH_HOME to a folder holding checkpoints/" + filename + "), or"
    )
    if not cached.is_file() and offline():
        raise WeightsError(
            _offline_help(f"{name} weights {weights.name} are not cached and TRANSFERLAB_OFFLINE=1.", hint)
        )
    if not cached.is_file():
        log.info("Downloading %s weights %s to %s", name, weights.name, cached)
    try:
        with socket_timeout():
            return weights.get_state_dict(progress=False)
    except (URLError, OSError, TimeoutError) as err:
        raise WeightsError(
            _offline_help(f"Could not download {name} weights {weights.name} from {weights.url}: {err}", hint)
        ) from err


def _timm_state(name: str) -> dict[str, torch.Tensor]:
    import timm

    hint = "pre-fill the Hugging Face cache (HF_HOME) on a machine with internet and set HF_HUB_OFFLINE=1, or"
    if offline():
        raise WeightsError(
            _offline_help(f"timm weights for {name} need a download and TRANSFERLAB_OFFLINE=1.", hint)
        )
    try:
        with socket_timeout():
            model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # timm/huggingface_hub raise many types for network failures
        raise WeightsError(
            _offline_help(f"Could not load pretrained timm weights for {name}: {err}", hint)
        ) from err
    return model.state_dict()


def read_weights_file(path: str | os.PathLike, trust_file: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict from a file; `weights_only=True` unless the user trusts the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"backbone.weights: no such file: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not trust_file)
    except Exception as err:
        if trust_file:
            raise WeightsError(f"backbone.weights: cannot read {file}: {err}") from err
        raise WeightsError(
            f"backbone.weights: cannot read {file} safely (weights_only=True): {err}\n"
            "If you trust this file, set backbone.trust_file=true to load it with full unpickling."
        ) from err
    return _unwrap_state_dict(obj, file)


def _unwrap_state_dict(obj: object, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"backbone.weights: {file} holds no state_dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_head_keys(state: Mapping[str, torch.Tensor], classifier_prefix: str) -> tuple[dict, list[str]]:
    """Separate the backbone's weights from those of the classification layer it had."""
    if any(k.startswith(_OUR_BACKBONE_PREFIX) for k in state):  # our LightningModule: backbone.* + head.*
        body = {
            k.removeprefix(_OUR_BACKBONE_PREFIX): v
            for k, v in state.items()
            if k.startswith(_OUR_BACKBONE_PREFIX)
        }
        head = [k for k in state if not k.startswith(_OUR_BACKBONE_PREFIX)]
        return body, head
    head = [k for k in state if k.startswith(classifier_prefix + ".")]
    return {k: v for k, v in state.items() if k not in head}, head


def load_backbone_state(backbone: Backbone, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load strictly except for head keys, with an error that lists what does not fit."""
    body, head_keys = split_head_keys(state, backbone.classifier_prefix)
    expected = backbone.module.state_dict()
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in expected]
    mismatched = [
        f"{k}: file {tuple(body[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in body
        if k in expected and body[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"  {label}: {shown}")
        raise WeightsError(
            f"backbone.weights: {origin} does not fit this backbone ({type(backbone.module).__name__}).\n"
            + "\n".join(problems)
            + "\nCheck that backbone.name matches the architecture the weights were saved from."
        )
    backbone.module.load_state_dict(body, strict=True)
    log.info("Loaded backbone weights from %s (%d tensors).", origin, len(body))
    if head_keys:
        log.info(
            "Skipped %d classification-head tensors (a new head is trained): %s",
            len(head_keys),
            ", ".join(head_keys[:6]),
        )
