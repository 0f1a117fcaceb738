"""Pruning a classifier: structured (whole channels, a really smaller network) and unstructured.

Structured: torch-pruning (MIT) traces the whole classifier's forward into a dependency graph, so
removing an output channel of one layer also removes the matching inputs of every layer that reads
it (residual additions, depthwise convolutions, squeeze-excitation, the head's input features).
Channels are ranked by the norm of their weights (`prune.importance`); every prunable layer of the
backbone loses the same fraction (`prune.amount`, uniform rather than global ranking: no layer is
emptied and the speed-up is predictable), or only the stages named in `prune.stages`. The head keeps
its own widths (its outputs are the classes). The new widths go into the model's hyperparameters
(`pruned`, see `models.pruned`), so the result saves and loads as an ordinary checkpoint.

Unstructured: `prune_unstructured` zeroes the smallest weights (torch.nn.utils.prune, global L1).
The tensors keep their shapes and dense kernels multiply the zeros anyway: it saves nothing in
latency or file size unless the model is stored or run sparse.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from transferlab.config.schema import PruneConfig
from transferlab.errors import ConfigError
from transferlab.models.classifier import ImageClassifier
from transferlab.models.pruned import module_shapes, pruned_num_features, record_pruned_shapes

log = logging.getLogger(__name__)

# families the tests prune (tests/test_prune.py) or that were checked by hand (VGG, ConvNeXt)
PRUNABLE_FAMILIES = "ResNet, MobileNetV3, EfficientNet, EfficientNet-Lite, VGG, ConvNeXt"


@dataclass(frozen=True)
class PruneReport:
    """What a structured pruning removed; MACs and parameters of the whole classifier on `example`."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    pruned: dict[str, dict[str, Any]]  # the model's `pruned` hyperparameter: its layer widths

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def check_prunable(model: ImageClassifier) -> None:
    """Refuse a backbone with attention layers: torch-pruning needs each one's head layout declared
    (and our record would have to rebuild it), which is not done here."""
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.MultiheadAttention) or hasattr(module, "num_heads"):
            config = model.backbone_config
            raise ConfigError(
                f"backbone.name={config.name} (source {config.source}) cannot be channel-pruned: "
                f"{name} ({type(module).__name__}) is an attention layer. Structured pruning works on "
                f"convolutional families: {PRUNABLE_FAMILIES}; or prune it unstructured"
            )


def stage_modules(model: ImageClassifier, per_stage: dict[str, float]) -> dict[tuple[nn.Module, ...], float]:
    """torch-pruning's per-layer ratios: the modules holding each named stage's parameters."""
    stages = {stage.name: stage for stage in model.stages}
    unknown = [name for name in per_stage if name not in stages]
    if unknown:
        raise ConfigError(
            f"prune.stages names {', '.join(map(repr, unknown))}, not a stage of backbone.name="
            f"{model.backbone_config.name}; its stages: {', '.join(stages)}"
        )
    ratios = {}
    for name, amount in per_stage.items():
        paths = dict.fromkeys(p.rpartition(".")[0] for p in stages[name].param_names)
        ratios[tuple(model.backbone.get_submodule(path) for path in paths if path)] = amount
    return ratios


def prune_classifier(
    model: ImageClassifier,
    example: torch.Tensor,
    amount: float,
    per_stage: dict[str, float] | None = None,
    importance: str = "l1",
) -> PruneReport:
    """Remove channels of `model`'s backbone in place (a global `amount`, or only the stages of
    `per_stage`, each by its amount); `example` is a batch of images (any size the model takes).
    The result's widths go into `model.hparams["pruned"]`: save it as any checkpoint."""
    import torch_pruning as tp

    config = PruneConfig(amount=amount, stages=per_stage, importance=importance)
    check_prunable(model)
    ratios = stage_modules(model, config.stages) if config.stages else None
    was_training = model.training
    model.eval()  # tracing runs the forward: no batch-norm statistics may move
    try:
        macs_before, params_before = tp.utils.count_ops_and_params(model, example)
        shape_before, shapes = _output_shape(model, example), module_shapes(model)
        with warnings.catch_warnings():
            # ConvNeXt's layer_scale (C, 1, 1): "will prune the last non-singleton dimension", the right one
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = _pruner(tp, model, example, config, ratios)
        pruner.step()
        _check_output(model, example, shape_before)
        macs_after, params_after = tp.utils.count_ops_and_params(model, example)
    finally:
        model.train(was_training)
    record = record_pruned_shapes(model, shapes, earlier=model.hparams.get("pruned"))
    model.hparams["pruned"] = record
    model.num_features = pruned_num_features(model.head)
    report = PruneReport(int(params_before), int(params_after), int(macs_before), int(macs_after), record)
    log.info(
        "pruned %s: %.2fM -> %.2fM parameters, %.1fM -> %.1fM MACs",
        model.backbone_config.name,
        params_before / 1e6,
        params_after / 1e6,
        macs_before / 1e6,
        macs_after / 1e6,
    )
    return report


def _pruner(tp: Any, model: ImageClassifier, example: torch.Tensor, config: PruneConfig, ratios: Any) -> Any:
    return tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1 if config.importance == "l1" else 2),
        pruning_ratio=0.0 if ratios else config.amount,
        pruning_ratio_dict=ratios,
        ignored_layers=[model.head],  # the head keeps its widths; its outputs are the classes
    )


def _output_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(model(example).shape)


def _check_output(model: nn.Module, example: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A pruned network that does not run, or answers in another shape, is a pruner bug: said so."""
    try:
        shape = _output_shape(model, example)
    except RuntimeError as err:
        raise RuntimeError(f"the pruned network no longer runs ({err}); please report this backbone") from err
    if shape != expected:
        raise RuntimeError(
            f"pruning changed the output shape {expected} to {shape}; please report this backbone"
        )


def rebuild(model: ImageClassifier) -> ImageClassifier:
    """A fresh `ImageClassifier` from `model`'s hyperparameters and weights, as a checkpoint loads it:
    after pruning in place, the network to fine-tune or save (every attribute consistent)."""
    fresh = ImageClassifier(**model.hparams)
    fresh.load_state_dict(model.state_dict())
    return fresh


def prune_unstructured(model: nn.Module, amount: float) -> float:
    """Zero the `amount` fraction of smallest-magnitude weights over all convolution and linear layers
    together (global L1), made permanent; returns the fraction of those weights now zero. Shapes and
    run time stay the same: dense kernels still multiply the zeros."""
    PruneConfig(amount=amount)  # the same check and message as prune.amount
    weights = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for module, name in weights:
        torch_prune.remove(module, name)  # the mask multiplied into the weight: a plain tensor again
    zeros = sum(int((m.weight == 0).sum()) for m, _ in weights)
    return zeros / sum(m.weight.numel() for m, _ in weights)
