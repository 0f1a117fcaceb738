"""Errors that reach the user: each names the config key, file or path at fault and what to do."""

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the valid choices."""


class DataError(ValueError):
    """The data on disk cannot be used as configured; the message names the path."""


class WeightsError(RuntimeError):
    """Pretrained or local weights cannot be loaded; the message says how to proceed."""


USER_ERRORS = (ConfigError, DataError, WeightsError)


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """For Hydra entry points: a user error ends a single run with its one-line message (exit code 2)
    instead of a traceback, logged first so that the run's log has it too. In a multirun the error
    is raised as is, so that the sweep records the job as failed and goes on."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            log.error("%s: %s", type(error).__name__, error)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            if not logging.getLogger().handlers:  # Hydra's job logging is off: nothing showed it
                print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
