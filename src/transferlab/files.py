"""Files written atomically: readers, and a crash mid-write, never see half a file.

Checkpoints (`AtomicCheckpointIO`, Lightning's checkpoint plugin in conf/trainer/default.yaml) and
JSON reports (`write_json`) both go through `atomic_write`: a temporary file in the target's folder,
fsync, rename over the target, fsync of the folder. A write the machine refuses (a full disk, a file-size
limit) is a `ResourceError` naming the file and the cause.

A failed run's traceback goes to error.txt in its directory (`save_traceback`); a continued run keeps an
earlier attempt's error.txt and metrics.json under other names (`keep_earlier`), so that neither is taken
for the outcome of this attempt.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from transferlab.errors import environment_cause, first_line, resource_error

ERROR_FILE = "error.txt"  # a failed run's traceback (sweep summaries list the run as failed)
METRICS_FILE = "metrics.json"  # a finished run's metrics (sweep summaries list the run as ok)
SWEEP_RECORD = (
    "multirun.yaml"  # in a sweep's folder: its config (launch.LaunchChecks writes it for any sweeper)
)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file, then rename it over `path`; on any failure the previous
    file at `path` is left as it was and the temporary file is removed. ResourceError when the machine
    refuses the write (ENOSPC, EFBIG, ...: `errors.ENVIRONMENT_ERRNOS`)."""
    path = Path(path)
    existed = path.exists()
    try:
        _write_and_rename(path, write)
    except Exception as error:
        cause = environment_cause(error)
        if cause is None:
            raise
        kept = f"the previous {path.name} is unchanged" if existed else "nothing was written"
        raise resource_error(cause, f"cannot write {path} ({kept})") from error
    _fsync_directory(path.parent)  # the rename itself survives a power cut


def _write_and_rename(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only tell here (delayed allocation, NFS)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON, indented and sorted, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written with `atomic_write`: an interrupted save (preemption, SIGKILL,
    a full disk) leaves the previous last.ckpt intact. Remote paths (s3://...) keep Lightning's way."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Checkpoints written off the training loop: Lightning's AsyncCheckpointIO (a copy of the tensors taken
    at the save, written by one thread) over `AtomicCheckpointIO`. A failed write is raised at the next
    save or when fit ends. SLURM's preemption checkpoint (hpc_ckpt_<n>.ckpt, saved on SIGUSR1 just before
    the job is requeued and stopped) is written at once, after the queued ones: it must exist before the
    process is gone."""

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        super().__init__(checkpoint_io or AtomicCheckpointIO())

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if Path(str(path)).name.startswith("hpc_ckpt"):
            self.teardown()  # waits for the queued saves (raising a failed one's error); a later save restarts it
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
            return
        super().save_checkpoint(checkpoint, path, storage_options)


def save_traceback(directory: str | os.PathLike, error: BaseException) -> Path | None:
    """Write the traceback of `error` to <directory>/error.txt (atomically: a full disk leaves no half
    file); an error.txt already there is kept aside first. A note on `error` names the file, so that a
    caller further up (the tool) knows it is saved, and a traceback shown in full says where it is.
    Nothing is written for an error marked by `leave_run_as_it_was` (returns None).
    Raises OSError (ResourceError) when it cannot be written: the caller decides how to tell that."""
    path = Path(directory) / ERROR_FILE
    if saved_traceback(error) == path:
        return path
    if any(note.startswith(_UNSAVED_NOTE) for note in _notes(error)):
        return None
    text = "".join(traceback.format_exception(error))
    keep_earlier(directory, ERROR_FILE)
    atomic_write(path, lambda f: f.write(text.encode()))
    _add_note(error, f"{_SAVED_NOTE}{path}")
    return path


def leave_run_as_it_was(error: BaseException, directory: str | os.PathLike) -> None:
    """Mark `error`, which stopped an attempt before it began in a finished run's directory (a refused
    resume=): its traceback is not saved there, where an error.txt would make the run look failed."""
    _add_note(
        error,
        f"{_UNSAVED_NOTE}{directory}: the finished run keeps its metrics.json (this attempt never began)",
    )


_SAVED_NOTE = "The traceback is saved in "
_UNSAVED_NOTE = "No error.txt was written to "


def _notes(error: BaseException) -> list[str]:
    return [note for note in getattr(error, "__notes__", ()) if isinstance(note, str)]


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10: the attribute that add_note fills (PEP 678), not shown in tracebacks
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def saved_traceback(error: BaseException) -> Path | None:
    """Where `save_traceback` saved this error's traceback, if it did."""
    for note in _notes(error):
        if note.startswith(_SAVED_NOTE):
            return Path(note.removeprefix(_SAVED_NOTE))
    return None


def keep_earlier(directory: str | os.PathLike, name: str) -> Path | None:
    """Rename <directory>/<name>, left by an earlier attempt of this run (before a resume= or a SLURM
    requeue), to <stem>.<time it was written><suffix> (error.txt -> error.2026-01-01_12-00-00.txt):
    kept, but no longer taken for this attempt's outcome. Returns the new name, None when there was none."""
    path = Path(directory) / name
    try:
        written = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(path.stat().st_mtime))
    except FileNotFoundError:
        return None
    n = 0
    while (kept := path.with_name(f"{path.stem}.{written}{f'.{n}' if n else ''}{path.suffix}")).exists():
        n += 1  # attempts that failed within one second: never write over a kept one
    path.rename(kept)
    return kept


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- why a torch file cannot be loaded --------------------------------------------------------------------

EMPTY_FILE = "is empty (0 bytes): its save or copy never wrote it"  # a torch file's, wherever it is read
_ZIP_MAGIC = b"PK"  # torch.save's format since torch 1.6 (Lightning's checkpoints)
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format: a pickle (protocol 2 and up)
_EXPORTED_HINT = "; an exported model.onnx or model.pt is not one: eval and predict take those as model_path="
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")  # torch.load's message


def why_torch_file_unreadable(file: Path, err: Exception, trust: bool, trust_key: str, wanted: str) -> str:
    """What torch.load's failure `err` means for this file, judged by its format (torch's messages do not
    say: random bytes and a checkpoint holding a class not on torch's allow-list fail alike). `trust`:
    whether it was loaded with full unpickling, `trust_key` the setting that does so; `wanted` says what
    to give instead of a file that is not a torch file ("a checkpoint of ours (.ckpt)")."""
    with file.open("rb") as f:
        head = f.read(8)
    truncated = "is truncated (it ends early: a save or copy that did not finish); use another file"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(file):  # the zip directory, written last, is missing
            return truncated
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
        if _is_torchscript_archive(names):
            return f"is a TorchScript model (export format=torchscript), not {wanted}{_EXPORTED_HINT}"
        if not any(name.endswith("/data.pkl") for name in names):
            return f"is a zip archive, not a PyTorch file: give {wanted}"
        unsafe = [] if trust else _unsafe_globals(file)
    elif head.startswith(_PICKLE_MAGIC):
        if isinstance(err, EOFError):
            return truncated
        unsafe = [] if trust else _UNSAFE_GLOBAL.findall(str(err))
    else:
        return (
            f"is not a PyTorch file (not what torch.save writes; it starts with {head!r}): give {wanted}"
            f"{_EXPORTED_HINT}"
        )
    if unsafe:
        return (
            f"holds {', '.join(unsafe)}, which loading safely (weights_only) does not unpickle. "
            f"If you trust this file, add {trust_key}=true to load it with full unpickling."
        )
    if trust:  # e.g. a class that is not importable here
        return f"cannot be loaded, even with full unpickling ({type(err).__name__}: {first_line(err)})"
    return f"is damaged: it cannot be read ({type(err).__name__}: {first_line(err)})"


def is_torchscript(file: Path) -> bool:
    """Whether the file is a TorchScript model (what torch.jit.save writes)."""
    with file.open("rb") as f:
        if not f.read(2).startswith(_ZIP_MAGIC):
            return False
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return _is_torchscript_archive(archive.namelist())


def _is_torchscript_archive(names: list[str]) -> bool:
    return any(name.endswith("/constants.pkl") for name in names)  # what torch.jit.save writes


def _unsafe_globals(file: Path) -> list[str]:
    """The classes and functions a file needs unpickled beyond torch's weights_only allow-list."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # a TorchScript archive, a damaged pickle: not a matter of trust
        return []
