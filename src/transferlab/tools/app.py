"""The one style of our command-line tools: a Hydra app whose configs come from the installed package,
whose failures end in one line (the traceback in the run's error.txt), and whose schemas are registered
before Hydra composes."""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from transferlab.config import register_configs
from transferlab.errors import USER_ERRORS, describe, environment_cause
from transferlab.files import save_traceback
from transferlab.launch import release_run_locks
from transferlab.runtime import is_multirun, is_rank_zero_process

CONFIG_PATH = "pkg://transferlab.conf"  # conf/ inside the package: tools work from an installed wheel too
USER_ERROR_STATUS = 2  # a config, data, weights or environment problem the message explains
FAILURE_STATUS = 1  # anything else (a bug): what Hydra and Python exit with too
INTERRUPTED_STATUS = 130  # Ctrl-C, as a shell reports it
log = logging.getLogger(__name__)


def exit_on_error(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Any failure of `task` ends a single run with one logged line instead of a traceback: what failed,
    and where its traceback is (error.txt in the run directory, for tools that have one). Exit status 2
    for a user error (USER_ERRORS, or the environment refusing a file operation: `errors.describe`), 1
    for anything else. The exception is raised as is in a multirun, so that the sweep records the job as
    failed and goes on, and with HYDRA_FULL_ERROR=1 (Hydra's switch for full tracebacks)."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except (Exception, KeyboardInterrupt) as error:  # SystemExit: the task chose its exit status
            message = _report(error)
            user_error = isinstance(error, USER_ERRORS) or environment_cause(error) is not None
            full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
            if full_error and (is_multirun() or not user_error):
                raise
            if is_multirun() and not isinstance(error, KeyboardInterrupt):
                raise JobFailed(message) from None  # the sweep records the job as failed and goes on
            if isinstance(error, KeyboardInterrupt):
                raise SystemExit(INTERRUPTED_STATUS) from None
            raise SystemExit(USER_ERROR_STATUS if user_error else FAILURE_STATUS) from None

    return guarded


class JobFailed(CompactHydraException):
    """A sweep job's failure as its one line: Hydra prints a compact exception without a traceback when
    it reports the failed job at the end of the sweep."""


def _report(error: BaseException) -> str:
    """Save the traceback, then log the one line (also on stderr when Hydra's job logging is off)."""
    message = "Interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else describe(error)
    saved, failure = _save_traceback(error)
    if failure:  # the original error is still the one to tell
        message += f" (its traceback could not be saved: {failure}; HYDRA_FULL_ERROR=1 shows it)"
    elif not isinstance(error, USER_ERRORS):  # a user error's message says it all; a bug needs its traceback
        message += f" (full traceback: {saved})" if saved else " (HYDRA_FULL_ERROR=1 shows the traceback)"
    raising = logging.raiseExceptions
    logging.raiseExceptions = False  # the log file may be on the disk that is full: no logging traceback
    try:
        log.error("%s", message)
    finally:
        logging.raiseExceptions = raising
    if not logging.getLogger().handlers:  # Hydra's job logging is off: nothing showed it
        print(f"Error: {message}", file=sys.stderr)
    return message


def _save_traceback(error: BaseException) -> tuple[Path | None, str | None]:
    """error.txt in the run directory, or why it could not be written. Tools with `hydra: tool` have no
    run directory; only rank 0 writes it, as it writes the run's other files."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None, None
    if not is_rank_zero_process():
        return None, None
    try:
        return save_traceback(HydraConfig.get().runtime.output_dir, error), None
    except OSError as failure:  # e.g. the disk is full
        return None, describe(failure)


def hydra_tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`@hydra_tool("<tool>")` on `task(cfg)`: `main()` parses the command line as Hydra overrides of
    conf/<tool>.yaml and runs the task."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(
            exit_on_error(task)
        )

        @functools.wraps(task)
        def main() -> Any:
            register_configs()
            return hydra_main()

        return main

    return decorate


def run_program(main: Callable[[], Any]) -> None:
    """A tool run as a program (`python train.py ...`, `transferlab <tool> ...`; not `run_in_process`).
    The objects its imports made are frozen (gc.freeze: left out of the collector's passes, which then
    walk only what the run makes) and the collector, off during the imports (transferlab.tools), is
    turned on. When it ends, everything is left out of the interpreter's last garbage collections: the
    OS frees the memory anyway, and those passes over a process holding torch, Lightning and Hydra cost
    about 1 s of a 3-epoch run's 17 s (benchmarks/overhead.py). atexit handlers, logging's shutdown and
    the flushing of files and streams run as usual."""
    gc.freeze()
    gc.enable()
    try:
        main()
    finally:
        gc.disable()
        gc.freeze()


def run_in_process(tool: str, overrides: list[str]) -> int:
    """`transferlab <tool> overrides...` in this process: Hydra's own command-line path, without the
    seconds a new process spends importing. Returns the exit status (a message it exited with goes to
    stderr, as Python prints it). The logging Hydra set up for the run is undone afterwards."""
    main = importlib.import_module(f"transferlab.tools.{tool}").main
    saved = _logging_state()
    GlobalHydra.instance().clear()  # a Hydra app (the demo) may be running this one
    try:
        with mock.patch.object(sys, "argv", [f"transferlab {tool}", *overrides]):
            main()
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
        _restore_logging(saved)
        release_run_locks()  # a run that exited (SystemExit) skips Hydra's on_run_end
    return 0


_LoggingState = dict[logging.Logger, tuple[list[logging.Handler], int, bool, bool]]


def _logging_state() -> _LoggingState:
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)),
    ]
    return {lg: (list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers}


def _restore_logging(saved: _LoggingState) -> None:
    """Every logger as it was; the handlers the run's logging config added are closed (its log files)."""
    kept = {handler for handlers, *_ in saved.values() for handler in handlers}
    for logger in _logging_state():
        for handler in logger.handlers:
            if handler not in kept:
                handler.close()
        handlers, level, propagate, disabled = saved.get(logger, ([], logging.NOTSET, True, False))
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled
        logger.setLevel(level)  # (setLevel, not assignment: it clears the loggers' level caches)
