"""The config: one schema (`schema.py`), what Hydra composes with (`store.py`), and parsing (`parse.py`)."""

from transferlab.config.parse import (
    parse_eval_config,
    parse_group,
    parse_pretrain_config,
    parse_train_config,
)
from transferlab.config.schema import TrainConfig
from transferlab.config.store import compose_config, register_configs

__all__ = [
    "TrainConfig",
    "compose_config",
    "parse_eval_config",
    "parse_group",
    "parse_pretrain_config",
    "parse_train_config",
    "register_configs",
]
