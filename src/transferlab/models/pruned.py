"""A channel-pruned network as plain data: which modules lost channels, and their new shapes.

Structured pruning (`compress.prune`) changes layer widths in place, so the architecture no longer
follows from `backbone.name` alone. The record written here (module name -> the attributes and the
tensor shapes that differ from the unpruned network) is stored with the model's other
hyperparameters (`ImageClassifier(pruned=...)`), and `apply_pruned_shapes` re-creates those widths on
a freshly built network before `load_state_dict`: every way of loading a checkpoint keeps working,
with `weights_only=True`, without pickling modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transferlab.errors import ConfigError

# the attributes of torch's layers that hold a width; what a pruner changes besides the tensors
WIDTH_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "num_channels",
    "in_features",
    "out_features",
    "normalized_shape",
)

PrunedRecord = dict[str, dict[str, Any]]  # module name -> {"attributes": {...}, "tensors": {name: shape}}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def module_shapes(model: nn.Module) -> PrunedRecord:
    """Every module's width attributes and own parameter/buffer shapes, as plain data."""
    shapes: PrunedRecord = {}
    for name, module in model.named_modules():
        attributes = {a: _plain(getattr(module, a)) for a in WIDTH_ATTRIBUTES if hasattr(module, a)}
        tensors = {
            tensor_name: list(tensor.shape)
            for tensor_name, tensor in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]
            if tensor is not None
        }
        if attributes or tensors:
            shapes[name] = {"attributes": attributes, "tensors": tensors}
    return shapes


def record_pruned_shapes(
    model: nn.Module, before: PrunedRecord, earlier: PrunedRecord | None = None
) -> PrunedRecord:
    """What differs between `model` now and its `module_shapes` taken before pruning, merged over the
    record of an earlier pruning (`earlier`: the model was already pruned when `before` was taken)."""
    record = {
        name: {"attributes": dict(e["attributes"]), "tensors": dict(e["tensors"])}
        for name, e in (earlier or {}).items()
    }
    for name, now in module_shapes(model).items():
        was = before.get(name, {"attributes": {}, "tensors": {}})
        changed = {
            kind: {key: value for key, value in now[kind].items() if was[kind].get(key) != value}
            for kind in ("attributes", "tensors")
        }
        if changed["attributes"] or changed["tensors"]:
            entry = record.setdefault(name, {"attributes": {}, "tensors": {}})
            entry["attributes"].update(changed["attributes"])
            entry["tensors"].update(changed["tensors"])
    return record


def apply_pruned_shapes(model: nn.Module, record: PrunedRecord) -> None:
    """Give a freshly built `model` the widths of `record`: attributes set, tensors re-created at the
    recorded shapes and re-initialised (the checkpoint's state_dict then fills them)."""
    modules = dict(model.named_modules())
    for name, entry in record.items():
        if name not in modules:
            raise ConfigError(
                f"the checkpoint's pruned architecture names a module {name!r} that "
                f"{type(model).__name__} does not have: it was pruned from another backbone"
            )
        _reshape(modules[name], entry)


def _reshape(module: nn.Module, entry: dict[str, Any]) -> None:
    for attribute, value in entry.get("attributes", {}).items():
        setattr(module, attribute, tuple(value) if isinstance(value, list) else value)
    for tensor_name, shape in entry.get("tensors", {}).items():
        old = getattr(module, tensor_name)
        if isinstance(old, nn.Parameter):
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            setattr(module, tensor_name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:  # a buffer (batch-norm running statistics), as persistent as it was
            persistent = tensor_name not in module._non_persistent_buffers_set
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            module.register_buffer(tensor_name, new, persistent=persistent)
    # a usable network even before load_state_dict: the layer's own initialisation at its new width
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def pruned_num_features(head: nn.Module) -> int:
    """The backbone's feature count after pruning: what the head's first linear layer now takes."""
    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
