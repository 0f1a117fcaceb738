"""The one style of our command-line tools: a Hydra app whose configs come from the installed package,
whose user errors end in one line, and whose schemas are registered before Hydra composes."""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any
from unittest import mock

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from transferlab.config import register_configs
from transferlab.errors import USER_ERRORS
from transferlab.runtime import is_multirun

CONFIG_PATH = "pkg://transferlab.conf"  # conf/ inside the package: tools work from an installed wheel too
log = logging.getLogger(__name__)


def exit_on_user_error(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """A user error ends a single run with its one-line message (exit code 2) instead of a traceback,
    logged first so that the run's log has it too. In a multirun the error is raised as is, so that the
    sweep records the job as failed and goes on."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except USER_ERRORS as error:
            log.error("%s: %s", type(error).__name__, error)
            if is_multirun():
                raise
            if not logging.getLogger().handlers:  # Hydra's job logging is off: nothing showed it
                print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return guarded


def hydra_tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`@hydra_tool("<tool>")` on `task(cfg)`: `main()` parses the command line as Hydra overrides of
    conf/<tool>.yaml and runs the task."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(
            exit_on_user_error(task)
        )

        @functools.wraps(task)
        def main() -> Any:
            register_configs()
            return hydra_main()

        return main

    return decorate


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
