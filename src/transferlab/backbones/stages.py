"""Every backbone as an ordered list of stages, stem first: the unit of partial and gradual
freezing and of layer-wise learning-rate decay.

Each source says how its models split (see `sources/`); the helpers here are the shared part:
grouping parameters by module-path prefixes, the top-level-children fallback for models no
source describes, and merging a stage holding only normalisation weights (ViT's final
LayerNorm, ConvNeXt's pre-logits norm) into its neighbour: it is part of a stage, not one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from transferlab.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    param_names: tuple[str, ...]  # names in the backbone's named_parameters()


Prefixes = list[list[str]]  # per stage, the module paths (or parameter names) it holds
Groups = list[tuple[str, list[str]]]  # (label, parameter names) per stage


def children_with_params(module: nn.Module, path: str) -> list[str]:
    """Paths (under `path`) of `module`'s direct children that hold parameters."""
    prefix = f"{path}." if path else ""
    return [
        f"{prefix}{name}" for name, child in module.named_children() if any(True for _ in child.parameters())
    ]


def top_level(model: nn.Module) -> Prefixes:
    """Fallback: each top-level child with parameters, the biggest Sequential split into its children
    when that is the only way to get several stages; the model's own parameters join the stem."""
    paths = children_with_params(model, "")
    if len(paths) < 3 and paths:
        biggest = max(paths, key=lambda path: _count(model.get_submodule(path)))
        if isinstance(model.get_submodule(biggest), nn.Sequential | nn.ModuleList):
            at = paths.index(biggest)
            paths[at : at + 1] = children_with_params(model.get_submodule(biggest), biggest)
    stages = [[path] for path in paths]
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own:
        stages = [own + stages[0], *stages[1:]] if stages else [own]
    return stages


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _owner(param_name: str, prefixes: Prefixes) -> int | None:
    """Index of the stage holding the longest prefix of `param_name`."""
    best, best_len = None, -1
    for index, stage in enumerate(prefixes):
        for prefix in stage:
            if (param_name == prefix or param_name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def group_by_prefixes(model: nn.Module, prefixes: Prefixes) -> Groups:
    """Each parameter goes to the stage with the longest matching module path; none may be left out."""
    groups: list[list[str]] = [[] for _ in prefixes]
    for name, _ in model.named_parameters():
        owner = _owner(name, prefixes)
        if owner is None:
            raise ConfigError(
                f"transferlab cannot place parameter {name!r} of {type(model).__name__} in a stage; "
                "please report this backbone"
            )
        groups[owner].append(name)
    return [("+".join(stage), group) for stage, group in zip(prefixes, groups, strict=True) if group]


def common_module(param_names: list[str]) -> str:
    """The deepest module path all the parameters share, e.g. `blocks.3`, else their top-level names."""
    common: list[str] = []
    for column in zip(*(name.split(".")[:-1] for name in param_names), strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or "+".join(dict.fromkeys(name.split(".")[0] for name in param_names))


def merge_norm_only(groups: Groups, model: nn.Module) -> Groups:
    """A group of only 1-d parameters (a norm layer) joins the stage before it, or the next one when
    it comes first."""
    params = dict(model.named_parameters())

    def norm_only(names: list[str]) -> bool:
        return all(params[name].ndim <= 1 for name in names)

    merged: Groups = []
    for label, names in groups:
        if merged and (norm_only(names) or (len(merged) == 1 and norm_only(merged[0][1]))):
            merged[-1] = (f"{merged[-1][0]}+{label}", merged[-1][1] + names)
        else:
            merged.append((label, names))
    return merged


def to_stages(groups: Groups, model: nn.Module) -> list[Stage]:
    """The final stages of a source's grouping: norm-only groups merged into their neighbours."""
    return [Stage(label, tuple(names)) for label, names in merge_norm_only(groups, model)]
