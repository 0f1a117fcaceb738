"""Errors that reach the user: each names the config key, file or path at fault and what to do."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the valid choices."""


class DataError(ValueError):
    """The data on disk cannot be used as configured; the message names the path."""


class WeightsError(RuntimeError):
    """Pretrained or local weights cannot be loaded; the message says how to proceed."""


USER_ERRORS = (ConfigError, DataError, WeightsError)
