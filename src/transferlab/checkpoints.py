"""Our Lightning checkpoints: read safely, checked against the data, found in a run directory.

(Writing them atomically is `files.AtomicCheckpointIO`, a Lightning plugin.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferlab.errors import ConfigError, DataError
from transferlab.files import EMPTY_FILE, why_torch_file_unreadable
from transferlab.models.classifier import VAL_METRICS_KEY


def read_checkpoint(
    path: str | Path,
    trust: bool = False,
    key: str = "ckpt_path",
    trust_key: str = "trust_checkpoint",
    pretraining: bool = False,
) -> dict[str, Any]:
    """The checkpoint dict, loaded with `weights_only=True` unless the user trusts the file. Anything
    else is a ConfigError that says what the file is: missing, a directory, empty, not a PyTorch file,
    truncated, damaged, a torch file that is not our checkpoint, or one that needs full unpickling.
    Messages name the file as `key=<file>` and the trust setting as `trust_key`. A pretraining run's
    checkpoint (pretrain.py) is refused unless `pretraining`: it holds no classifier."""
    file = Path(path).expanduser()
    check_is_file(file, key)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=not trust)
    except OSError as err:
        raise ConfigError(f"{key}={file} cannot be read ({err.strerror or err})") from err
    except Exception as err:
        why = why_torch_file_unreadable(file, err, trust, trust_key, "a checkpoint of ours (.ckpt)")
        raise ConfigError(f"{key}={file} {why}") from err
    _check_is_ours(file, checkpoint, key, pretraining)
    return checkpoint


def check_is_file(file: str | Path, key: str) -> None:
    """`key=file` names a checkpoint file that exists and is not empty; else what it is instead."""
    file = Path(file).expanduser()
    if file.is_dir():
        found = sorted(p.name for p in (file / "checkpoints").glob("*.ckpt"))
        hint = f" (a run directory: give one of its checkpoints/, {', '.join(found)})" if found else ""
        raise ConfigError(f"{key}={file} is a directory, not a checkpoint file{hint}")
    if not file.exists():
        raise ConfigError(f"{key}={file}: no such file")
    if not file.is_file():
        raise ConfigError(f"{key}={file} is not a regular file")
    if file.stat().st_size == 0:
        raise ConfigError(f"{key}={file} {EMPTY_FILE}; use another checkpoint")


def _check_is_ours(file: Path, checkpoint: Any, key: str, pretraining: bool = False) -> None:
    """A torch file that is not our Lightning checkpoint: say what it is instead."""
    if isinstance(checkpoint, torch.jit.ScriptModule):  # torch.load with full unpickling opens TorchScript
        raise ConfigError(
            f"{key}={file} is a TorchScript model (export format=torchscript), not a checkpoint; eval and "
            "predict take it as model_path="
        )
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{key}={file} holds a {type(checkpoint).__name__}, not a checkpoint")
    if "state_dict" not in checkpoint:
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            raise ConfigError(
                f"{key}={file} is a plain state_dict (weights only), not a checkpoint of a run; "
                "backbone weights are given as backbone.weights=<file>"
            )
        raise ConfigError(f"{key}={file} is not a Lightning checkpoint (it has no state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and "method" in hparams and "class_names" not in hparams:
        if pretraining:
            return
        raise ConfigError(
            f"{key}={file} is a pretraining checkpoint (pretrain.py), which holds a backbone but no "
            f"classifier: fine-tune it with train.py backbone.weights={file}"
        )
    if not isinstance(hparams, dict) or "class_names" not in hparams:
        raise ConfigError(
            f"{key}={file} is a Lightning checkpoint of another model, not of transferlab "
            "(no class names in its hyper_parameters)"
        )


def check_checkpoint_classes(
    checkpoint: dict[str, Any], path: str | Path, class_names: list[str], key: str = "ckpt_path"
) -> None:
    """The data must have exactly the classes, in the order, the checkpoint's head was trained on."""
    trained = list(checkpoint["hyper_parameters"]["class_names"])
    if trained != list(class_names):
        raise DataError(
            f"{key}={path} was trained on {len(trained)} classes {trained}, but the data has "
            f"{len(class_names)} classes {list(class_names)}. Use data with the same classes "
            "(data.classes=[...] keeps a subset, in the given order)."
        )


def checkpoint_run_dir(ckpt_path: str | Path) -> Path:
    """The run a checkpoint belongs to, where train.py saves it: <run>/checkpoints/x.ckpt -> <run>."""
    return Path(ckpt_path).expanduser().resolve().parent.parent


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps the end of its last epoch: what resume= and SLURM requeues continue from."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint was saved after (read without loading its tensors)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0))


def checkpoint_epochs(state: dict[str, Any]) -> int:
    """The training epochs a checkpoint (as `read_checkpoint` returns it) has completed: Lightning's
    fit-loop progress, counting an epoch whose batches have all run (last.ckpt is saved at its
    validation, before Lightning marks the epoch completed); a checkpoint saved mid-epoch has not."""
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", state.get("epoch", 0)))


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """Where the checkpoint callbacks saved at the time (their `dirpath`, kept in the checkpoint)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return [
        Path(callback["dirpath"])
        for key, callback in state.get("callbacks", {}).items()
        if key.startswith("ModelCheckpoint") and isinstance(callback, dict) and callback.get("dirpath")
    ]


def stored_val_metrics(path: str) -> dict[str, float]:
    """The validation metrics a checkpoint was saved with ({} if none): equal to validating it again, since
    they were measured on these very weights, without the second pass over the val split. Memory-mapped:
    only this small entry is read."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict(checkpoint.get(VAL_METRICS_KEY, {}))


def stored_hyperparameters(path: str | Path) -> dict[str, Any] | None:
    """A `.ckpt` file's hyperparameters (memory-mapped: only they are read), or None for any other file
    (a state_dict, a torchvision download, one that cannot be read: its loading says what is wrong)."""
    if Path(path).suffix != ".ckpt":
        return None
    try:
        checkpoint = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return hparams if isinstance(hparams, dict) else None
