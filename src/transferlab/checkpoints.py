"""Our Lightning checkpoints: read safely, checked against the data, found in a run directory.

(Writing them atomically is `files.AtomicCheckpointIO`, a Lightning plugin.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferlab.errors import ConfigError, DataError


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The checkpoint dict, loaded with `weights_only=True` unless the user trusts the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"ckpt_path={file}: no such file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=not trust)
    except Exception as err:
        hint = (
            ""
            if trust
            else " If you trust this file, add trust_checkpoint=true to load it with full unpickling."
        )
        raise ConfigError(f"ckpt_path={file}: cannot be read ({err}).{hint}") from err
    if "hyper_parameters" not in checkpoint or "class_names" not in checkpoint["hyper_parameters"]:
        raise ConfigError(
            f"ckpt_path={file} is not a transferlab checkpoint (no class names in its hyper_parameters)"
        )
    return checkpoint


def check_checkpoint_classes(checkpoint: dict[str, Any], path: str | Path, class_names: list[str]) -> None:
    """The data must have exactly the classes, in the order, the checkpoint's head was trained on."""
    trained = list(checkpoint["hyper_parameters"]["class_names"])
    if trained != list(class_names):
        raise DataError(
            f"ckpt_path={path} was trained on {len(trained)} classes {trained}, but the data has "
            f"{len(class_names)} classes {list(class_names)}. Use data with the same classes "
            "(data.classes=[...] keeps a subset, in the given order)."
        )


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps the end of its last epoch: what resume= and SLURM requeues continue from."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint was saved after (read without loading its tensors)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0))
