"""Load pretrained weights into a backbone: a source's named weights or a local file.

`backbone.weights` is one of
- a weights name of the source (torchvision: `DEFAULT`, `IMAGENET1K_V2`, ...; timm: `DEFAULT`/`pretrained`;
  packaged: `IMAGENET1K` or its alias `DEFAULT`, from an installed pip package, never downloaded);
- a local file: a state_dict, a torchvision/timm checkpoint, or a Lightning `.ckpt` of ours;
- null: random initialisation (logged as a warning).
Weights of the removed classification layer are skipped and reported; any other missing or
unexpected key is an error. Downloads that cannot happen fail within seconds, saying how to
proceed offline; set TRANSFERLAB_OFFLINE=1 to never try.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from transferlab.backbones.registry import Backbone, get_source
from transferlab.errors import WeightsError
from transferlab.files import EMPTY_FILE, is_torchscript, why_torch_file_unreadable

log = logging.getLogger(__name__)

_OUR_BACKBONE_PREFIX = "backbone."
_WEIGHTS_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def load_pretrained(
    backbone: Backbone, source: str, model: str, weights: str | None, trust_file: bool = False
) -> None:
    """Fill `backbone` in place according to `backbone.weights`."""
    if weights is None:
        log.warning("backbone.weights=null: %s starts from RANDOM weights (no transfer learning).", model)
        return
    if is_weights_file(weights):
        state = read_weights_file(weights, trust_file)
        load_backbone_state(backbone, state, origin=weights)
        return
    state = get_source(source).pretrained_state(model, weights)
    load_backbone_state(backbone, state, origin=f"{source}:{model}:{weights}")


def is_weights_file(weights: str) -> bool:
    """`backbone.weights` names a file (existing or not), not a weights name like IMAGENET1K_V2."""
    looks_like_path = "/" in weights or "\\" in weights or weights.endswith(_WEIGHTS_SUFFIXES)
    return looks_like_path or Path(weights).expanduser().is_file()


def offline_help(what: str, cache_hint: str) -> str:
    """The message of a download that cannot happen: what failed, then every way to run offline."""
    return (
        f"{what}\nTo run offline, either\n"
        f"  - {cache_hint}\n"
        "  - pass a local file: backbone.weights=/path/to/weights.pth (state_dict or checkpoint), or\n"
        "  - train from scratch: backbone.weights=null"
    )


def read_weights_file(path: str | os.PathLike, trust_file: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict from a file; `weights_only=True` unless the user trusts the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"backbone.weights: no such file: {file}")
    if file.stat().st_size == 0:
        raise WeightsError(f"backbone.weights={file} {EMPTY_FILE}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    # e.g. an exported model.pt: read by torch.jit.load, not by the safe weights_only loader
    if is_torchscript(file):
        if not trust_file:
            raise WeightsError(
                f"backbone.weights={file} is a TorchScript model; to take its weights, add "
                "backbone.trust_file=true (for a model exported by export.py, its checkpoint is the better start)"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
            return _unwrap_state_dict(torch.jit.load(str(file), map_location="cpu"), file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not trust_file)
    except Exception as err:
        why = why_torch_file_unreadable(
            file,
            err,
            trust_file,
            "backbone.trust_file",
            "a state_dict or checkpoint (.pth, .ckpt, .safetensors)",
        )
        raise WeightsError(f"backbone.weights={file} {why}") from err
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


def split_head_keys(
    state: Mapping[str, torch.Tensor], classifier_prefix: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Separate the backbone's weights from those of the classification layer it had."""
    if any(k.startswith(_OUR_BACKBONE_PREFIX) for k in state):  # our LightningModule: backbone.* + head.*
        body = {
            k.removeprefix(_OUR_BACKBONE_PREFIX): v
            for k, v in state.items()
            if k.startswith(_OUR_BACKBONE_PREFIX)
        }
        head = [k for k in state if not k.startswith(_OUR_BACKBONE_PREFIX)]
        # layers a pooling head's backbone does without (VGG's fully connected ones) are skipped too
        unused = [k for k in body if k.startswith(classifier_prefix + ".")]
        return {k: v for k, v in body.items() if k not in unused}, head + unused
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
        top = backbone.classifier_prefix.split(".")[0] + "."
        hint = (
            f"\nThe file has no {top[:-1]} layers: it was saved for a pooling head (or by pretrain.py), "
            "which does without them; fine-tune it with head=gap or head=attention."
            if missing and not unexpected and not mismatched and all(k.startswith(top) for k in missing)
            else "\nCheck that backbone.name matches the architecture the weights were saved from."
        )
        raise WeightsError(
            f"backbone.weights: {origin} does not fit this backbone ({type(backbone.module).__name__}).\n"
            + "\n".join(problems)
            + hint
        )
    broken = [k for k, v in body.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # a run that diverged saves NaN weights; trained on, they give NaN from the first step
        shown = ", ".join(broken[:3]) + (f", ... ({len(broken)} in all)" if len(broken) > 3 else "")
        raise WeightsError(
            f"backbone.weights: {origin} holds NaN or infinite values ({shown}): the run that saved it "
            "diverged; use an earlier checkpoint of it, or train it again with a lower learning rate"
        )
    backbone.module.load_state_dict(body, strict=True)
    log.info("Loaded backbone weights from %s (%d tensors).", origin, len(body))
    if head_keys:
        log.info(
            "Skipped %d tensors outside the backbone (a classifier, decoder or projection head; a new head "
            "is trained): %s",
            len(head_keys),
            ", ".join(head_keys[:6]),
        )
