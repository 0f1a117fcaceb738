"""Errors that reach the user: each names the config key, file or path at fault and what to do.

Also how any other failure is told in one line (`describe`): the environment's faults (a full disk, a
file-size limit) by their cause, an error in a DataLoader worker as the original error, a bug by its
type, message and where it was raised.
"""

from __future__ import annotations

import errno
import re
import sysconfig
import traceback
from pathlib import Path


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the valid choices."""


class DataError(ValueError):
    """The data on disk cannot be used as configured; the message names the path."""


class WeightsError(RuntimeError):
    """Pretrained or local weights cannot be loaded; the message says how to proceed."""


class ResourceError(OSError):
    """The machine refused what the run needs (no space left, a quota or file-size limit, a read-only or
    unwritable folder, too many open files); the message names the file and the cause."""


USER_ERRORS = (ConfigError, DataError, WeightsError, ResourceError)

# errno values that the environment causes, not our code, with what to tell the user
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit such as `ulimit -f`, or the file system's largest file)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EMFILE: "too many open files (`ulimit -n`; fewer data.num_workers need fewer)",
    errno.ENFILE: "too many open files in the system",
    errno.ENOMEM: "out of memory",
    errno.EIO: "input/output error (a failing disk or a lost network file system)",
}


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line: what one-line messages quote of a library's error."""
    return _first_line(str(error)) or "no message"


def _first_line(message: str) -> str:
    """The first non-empty line; with the next one when it ends in a colon (Hydra's "Error in call to
    target 'X':" puts the reason below it)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def environment_cause(error: BaseException | None) -> OSError | None:
    """The OSError of the environment (ENVIRONMENT_ERRNOS) that `error` is or that led to it. The chain
    is searched because libraries re-raise it as their own error: torch.save reports a write that
    failed with EFBIG as RuntimeError("unexpected pos ..."), raised while handling the OSError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def environment_reason(cause: OSError) -> str:
    """'no space left on device [ENOSPC]': the cause in words, with its errno name to search for."""
    name = errno.errorcode.get(cause.errno or 0, str(cause.errno))
    return f"{ENVIRONMENT_ERRNOS.get(cause.errno or 0, cause.strerror)} [{name}]"


def resource_error(cause: OSError, action: str) -> ResourceError:
    """A ResourceError for `cause`: '<action>: <reason>', e.g. action='cannot write <file>'."""
    return ResourceError(f"{action}: {environment_reason(cause)}")  # one argument: str() is the message


def describe(error: BaseException) -> str:
    """The failure in one line for the user (the traceback goes to the run's error.txt)."""
    cause = environment_cause(error)
    if cause is not None and not isinstance(error, USER_ERRORS):
        file, frame = f"{cause.filename}: " if cause.filename else "", _raised_at(cause)
        return f"{type(cause).__name__}: {file}{environment_reason(cause)}" + (
            f" (raised at {frame})" if frame else ""
        )
    name, message, frame = type(error).__name__, str(error), _raised_at(error)
    worker = _WORKER_ERROR.match(message)
    if worker:  # torch re-raises a worker's error with the worker's whole traceback as its message
        name = worker["type"] if isinstance(error, USER_ERRORS) else f"{worker['type']} {worker['where']}"
        message, frame = _original_message(message, worker["type"]), _last_frame(message) or frame
    if isinstance(error, USER_ERRORS):
        return f"{name}: {message}"
    return f"{name}: {_first_line(message) or '(no message)'}" + (f" (raised at {frame})" if frame else "")


_WORKER_ERROR = re.compile(r"Caught (?P<type>\w+) (?P<where>in DataLoader worker process \d+)\.\nOriginal ")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)', re.MULTILINE)


def _original_message(wrapped: str, type_name: str) -> str:
    """The message at the end of a worker's formatted traceback ('<module>.<Type>: <message>')."""
    lines = wrapped.rstrip("\n").split("\n")
    final = re.compile(rf"^(\w+\.)*{re.escape(type_name)}(: |$)")
    for i in range(len(lines) - 1, -1, -1):
        if final.match(lines[i]):
            return "\n".join([lines[i].partition(": ")[2], *lines[i + 1 :]]).strip()
    return wrapped


def _last_frame(formatted: str) -> str | None:
    """`_raised_at` for a traceback formatted as text (a DataLoader worker's)."""
    return _innermost_of_ours([(m["file"], int(m["line"]), m["func"]) for m in _FRAME.finditer(formatted)])


def _raised_at(error: BaseException) -> str | None:
    """Where `error` was raised: the innermost frame of code that is not a library's (ours, or the
    user's callbacks), which says which of our calls failed even when torch or the stdlib raised."""
    frames = traceback.extract_tb(error.__traceback__)
    return _innermost_of_ours([(f.filename, f.lineno or 0, f.name) for f in frames])


def _innermost_of_ours(frames: list[tuple[str, int, str]]) -> str | None:
    ours = [f for f in frames if f[0].startswith(_PACKAGE) or not f[0].startswith(_LIBRARIES)]
    return _frame_text(*(ours or frames)[-1]) if frames else None


_PACKAGE = str(Path(__file__).parent)  # ours, also when installed among the libraries
_LIBRARIES = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")})


def _frame_text(filename: str, line: int, function: str) -> str:
    path = Path(filename)
    return f"{path.parent.name}/{path.name}:{line} in {function}"
