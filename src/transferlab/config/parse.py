"""From a composed config (or the plain data a checkpoint or a saved run holds) to the schema's
dataclasses: types checked, unknown keys refused, values checked, once, before any data is read."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from transferlab.config import schema as s
from transferlab.config.store import ALIASES, DISCRIMINATORS, OPTIONS, PRETRAIN_GROUPS
from transferlab.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def schema_for(group: str, values: Mapping[str, Any]) -> type:
    """The option's schema, told by its `name` (or `_target_`); an unknown one lists the valid ones."""
    options = OPTIONS[group]
    if len(options) == 1:
        return next(iter(options.values()))
    key = DISCRIMINATORS.get(group, "name")
    value = values.get(key) if isinstance(values, Mapping) else None
    by_value = {getattr(schema, key): schema for schema in options.values() if getattr(schema, key) != "???"}
    if value in by_value:
        return by_value[value]
    if group == "optim" and _optimizer_class(value) is not None:
        return s.OptimConfig  # another torch optimizer: our keys, its own arguments in optim.extra
    valid = [*by_value, *ALIASES.get(group, {})]
    if group == "data" and value is None:  # data=from_checkpoint: keys to override, no data of its own
        raise ConfigError(
            "data.name is not set: choose data=<one of: " + ", ".join(valid) + "> (data=from_checkpoint, a "
            "checkpoint's own data, is for eval, export, optimize and analyze)"
        )
    if group == "optim":
        valid.append("or any importable torch.optim.Optimizer class (optim=custom)")
    raise ConfigError(f"{group}.{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _optimizer_class(target: Any) -> type | None:
    import torch
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _option_name(group: str, schema: type) -> str:
    """How messages name the option: `data=digits`; a group with one schema, just by its name."""
    if len(OPTIONS[group]) == 1:
        return group
    names = [name for name, option in OPTIONS[group].items() if option is schema]
    return f"{group}={names[0]}" if names else f"{group} ({schema.__name__})"


def build(schema: type, values: Mapping[str, Any], where: str, option: str) -> Any:
    """`values` merged into `schema`: types converted or refused, unknown keys refused, then the
    dataclass is made (its `__post_init__` checks the values). `where` prefixes keys in messages."""
    refuse_non_finite(values, where)
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), dict(values))
        return OmegaConf.to_object(node)
    except ConfigKeyError as err:
        path = str(err.full_key or err.key)
        parent, owner = _node_schema(schema, path.split(".")[:-1], option)
        known = ", ".join(f.name for f in dataclasses.fields(parent))
        hint = "A `+key=value` override adds keys that nothing reads: check the spelling."
        if where == "optim.":
            hint += f" Other arguments of the optimizer class go in optim.extra: +optim.extra.{err.key}=..."
        raise ConfigError(f"{where}{path} is not a key of {owner}; its keys are: {known}. ({hint})") from None
    except MissingMandatoryValue as err:
        key = f"{where}{err.full_key}"
        raise ConfigError(f"{key} must be set, e.g. {key}=... ({option} has no default for it)") from None
    except OmegaConfBaseException as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{where}{err.full_key}: {first}") from None


def refuse_non_finite(values: Any, where: str) -> None:
    """No key of ours, nor a Lightning Trainer argument, means anything at nan or inf, and the range
    checks cannot see nan (every comparison with it is false): a run would train on NaN and end with
    exit status 0. So they are refused, wherever they are."""
    if isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"{where.rstrip('.')}={values} must be a finite number")
    if isinstance(values, Mapping):
        for key, value in values.items():
            refuse_non_finite(value, f"{where}{key}.")
    elif isinstance(values, list | tuple):
        for index, value in enumerate(values):
            refuse_non_finite(value, f"{where.rstrip('.')}[{index}].")


def _node_schema(schema: type, parents: list[str], option: str) -> tuple[type, str]:
    """The dataclass of the node at `parents` inside `schema` (`prune` of optimize.yaml: PruneConfig),
    and how messages name it; the nearest dataclass above when a level is not one."""
    walked: list[str] = []
    for name in parents:
        kind = typing.get_type_hints(schema).get(name)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            break
        schema = kind
        walked.append(name)
    return schema, f"{'.'.join(walked)} ({option})" if walked else option


def parse_group(group: str, values: Mapping[str, Any]) -> Any:
    """One group's dataclass from a mapping, e.g. `parse_group("data", {"name": "digits"})`."""
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    values = dict(values)
    if group in ALIASES and "name" in values:  # an old name stands for its option
        values["name"] = ALIASES[group].get(values["name"], values["name"])
    schema = schema_for(group, values)
    return build(schema, values, f"{group}.", _option_name(group, schema))


def _plain_config(cfg: DictConfig, throw_on_missing: bool = True) -> dict[str, Any]:
    """`throw_on_missing=False`: a key that must be set is left to `build`, which first refuses a key
    that is not one (`+input=...` for `inputs` is then named as the typo it is)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=throw_on_missing)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set, e.g. {err.full_key}=...") from None
    except InterpolationResolutionError as err:  # ${oc.env:UNSET}, ${no.such.key}, a resolver's failure
        raise ConfigError(f"{err.full_key}: {first_line(err)}") from None
    plain.pop("hydra", None)
    return plain


def parse_train_config(cfg: DictConfig) -> s.TrainConfig:
    """train.yaml's config as dataclasses; every check that needs neither data nor a model."""
    plain = _plain_config(cfg)
    groups = {group: parse_group(group, plain[group]) for group in OPTIONS}
    config = build(s.TrainConfig, plain, "", "train.yaml")
    config = dataclasses.replace(config, **groups)
    if isinstance(config.data, s.UnlabeledConfig):
        raise ConfigError(
            "data=unlabeled has no labels to train a classifier on: pretrain on it (pretrain.py "
            "data=unlabeled ...), then train with data=imagefolder and backbone.weights=<its checkpoint>"
        )
    check_trainer(config.trainer)
    check_optimizer(config.optim)
    max_epochs = _check_run_length(config.trainer)
    _check_validation(config.trainer, max_epochs, config.optimized_metric)
    _check_milestones(config.freeze, max_epochs)
    _check_warmup(config.scheduler, max_epochs)
    _check_frozen_backbone(config.freeze, config.optim)
    _check_unused_settings(config)
    _check_callback_monitors(config.callbacks)
    _check_cache_features(config)
    return config


def parse_pretrain_config(cfg: DictConfig) -> s.PretrainConfig:
    """pretrain.yaml's config as dataclasses, with the checks training makes of the same keys."""
    plain = _plain_config(cfg)
    groups = {group: parse_group(group, plain[group]) for group in PRETRAIN_GROUPS}
    config = dataclasses.replace(build(s.PretrainConfig, plain, "", "pretrain.yaml"), **groups)
    check_trainer(config.trainer)
    check_optimizer(config.optim)
    max_epochs = _check_run_length(config.trainer)
    _check_validation(config.trainer, max_epochs, config.optimized_metric)
    _check_warmup(config.scheduler, max_epochs)
    _check_callback_monitors(config.callbacks)
    if config.method == "simclr" and config.data.batch_size < 2:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size}: method=simclr contrasts the images of a batch, "
            "give at least 2 (SimCLR wants large batches: 256 and more on GPUs)"
        )
    return config


def parse_pretrain_method(values: Mapping[str, Any]) -> s.AutoencoderConfig | s.SimCLRConfig:
    """A pretraining checkpoint's method (its keys, with its `name`) as the schema's dataclass."""
    name = values.get("name")
    if name not in s.PRETRAIN_METHODS:
        raise ConfigError(f"method={name!r} is not valid; choose one of: {', '.join(s.PRETRAIN_METHODS)}")
    return build(s.PRETRAIN_METHODS[name], values, f"{name}.", f"method={name}")


def backbone_never_trains(freeze: s.FreezeConfig) -> bool:
    """freeze=linear_probe, or partial with trainable_blocks=0."""
    return isinstance(freeze, s.LinearProbeConfig) or (
        isinstance(freeze, s.PartialFinetuneConfig) and freeze.trainable_blocks == 0
    )


def cache_features_obstacle(config: s.TrainConfig) -> str | None:
    """What in the config makes the backbone's features of an image change between epochs, so that they
    cannot be computed once (`model.cache_features`); None when nothing does. The backbone's own layers
    (dropout) and the number of processes are checked when the run is built (`finetune.feature_cache`)."""
    freeze, augment = config.freeze, config.augment
    if config.distill.teacher is not None:
        return "distill.teacher runs the teacher on every training batch's images"
    if not backbone_never_trains(freeze):
        return f"freeze={freeze.name} trains the backbone, so its features change as it learns"
    if not isinstance(augment, s.NoAugmentConfig):
        return (
            f"augment={augment.name} makes the training images random, so their features differ every "
            "epoch (augment=none resizes and center-crops them like evaluation images)"
        )
    for key in ("mixup_alpha", "cutmix_alpha"):
        if getattr(augment, key) > 0:
            return f"augment.{key}={getattr(augment, key)} mixes the images of each training batch at random"
    return None


def _check_cache_features(config: s.TrainConfig) -> None:
    reason = cache_features_obstacle(config) if config.model.cache_features is True else None
    if reason is not None:
        raise ConfigError(
            f"model.cache_features=true cannot be: {reason}. Use model.cache_features=auto (on exactly when "
            "it is valid) or false"
        )


def _check_unused_settings(config: s.TrainConfig) -> None:
    """Settings that another setting makes moot would be silently ignored: refused, naming both."""
    if s.is_set(config.loss, "focal_gamma") and config.data.imbalance != "focal":
        raise ConfigError(
            f"loss.focal_gamma={config.loss.focal_gamma} is read only with data.imbalance=focal "
            f"(it is {config.data.imbalance})"
        )
    tune_keys = [f.name for f in dataclasses.fields(config.tune) if f.name != "lr_find"]
    if not config.tune.lr_find and any(s.is_set(config.tune, key) for key in tune_keys):
        changed = next(key for key in tune_keys if s.is_set(config.tune, key))
        raise ConfigError(f"tune.{changed} is read only with tune.lr_find=true (the LR finder)")
    if config.tune.lr_find and config.ckpt_path and not config.resume:  # a resumed run found its LR already
        raise ConfigError(
            "tune.lr_find=true finds a learning rate for a fresh start; it does not run with ckpt_path= "
            "(set optim.lr instead)"
        )
    augment, data = config.augment, config.data
    if isinstance(augment, s.NoAugmentConfig):
        for key in ("crop_scale", "hflip"):
            if s.is_set(augment, key):
                raise ConfigError(
                    f"augment.{key} is not read by augment=none (images are resized and center-cropped as "
                    "for evaluation): choose augment=basic"
                )
    elif data.min_crop_scale is not None and augment.crop_scale[1] < data.min_crop_scale:
        raise ConfigError(
            f"augment.crop_scale={list(augment.crop_scale)} lies below data.min_crop_scale={data.min_crop_scale} "
            f"(data={data.name}: smaller crops would change the label): raise it"
        )
    checkpoints = [node for node in (config.callbacks or {}).values() if isinstance(node, Mapping)]
    if config.calibrate and not any(node.get("monitor") and node.get("filename") for node in checkpoints):
        raise ConfigError(
            "calibrate=true stores the temperature in best.ckpt, which callbacks.model_checkpoint makes: "
            "keep that callback (with a monitor)"
        )
    root_dir = trainer_arg(config.trainer, "default_root_dir")
    if root_dir is not None and str(root_dir) != config.paths.output_dir:
        raise ConfigError(
            f"trainer.default_root_dir={root_dir}: a run writes into its own directory "
            f"({config.paths.output_dir}); choose it with hydra.run.dir or paths.output_root"
        )


def _check_callback_monitors(callbacks: Mapping[str, Any] | None) -> None:
    """A callback that monitors a metric (early stopping, a checkpoint) monitors one the model logs."""
    for name, node in (callbacks or {}).items():
        if isinstance(node, Mapping) and node.get("monitor") is not None:
            mode = node.get("mode")
            s.check_monitored_metric(
                node["monitor"], f"callbacks.{name}.monitor", mode, f"callbacks.{name}.mode"
            )


def parse_eval_config(cfg: DictConfig) -> s.EvalConfig:
    """eval.yaml's config; `data` stays a mapping of the keys that were set (see `eval_data_config`)."""
    plain = _plain_config(cfg, throw_on_missing=False)
    config = build(s.EvalConfig, plain, "", "eval.yaml")
    check_trainer(config.trainer)
    return config


def parse_tool_config(cfg: DictConfig, schema: type, config_name: str) -> Any:
    """A tool's config (predict.yaml, export.yaml, analyze.yaml) as its schema; a `data` node stays the
    mapping of the keys that were set, as eval's (see `evaluation.eval_data_config`)."""
    return build(schema, _plain_config(cfg, throw_on_missing=False), "", config_name)


def _trainer_parameters() -> Mapping[str, inspect.Parameter]:
    import lightning as L

    return inspect.signature(L.Trainer.__init__).parameters


def trainer_arg(trainer: Mapping[str, Any], name: str) -> Any:
    """`trainer.<name>`, or Lightning's default when the config leaves it out (Lightning owns the trainer
    group: its Trainer's signature is the schema)."""
    return trainer[name] if name in trainer else _trainer_parameters()[name].default


def check_optimizer(optim: s.OptimConfig) -> None:
    """The keyword arguments the optimizer will get are arguments of its class."""
    cls = _optimizer_class(optim._target_)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(optim.optimizer_kwargs()) - accepted)
    if unknown:
        raise ConfigError(
            f"optim: {', '.join(unknown)} is not an argument of {optim._target_}; its arguments: "
            f"{', '.join(sorted(accepted))}"
        )


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Every `trainer.*` key is an argument of Lightning's Trainer (it owns their types and defaults)."""
    accepted = set(_trainer_parameters()) | {"_target_"}
    unknown = sorted(set(trainer) - accepted)
    if unknown:
        raise ConfigError(
            f"trainer.{unknown[0]} is not an argument of lightning.Trainer; see "
            "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-class-api"
        )


def _check_run_length(trainer: Mapping[str, Any]) -> int:
    """A training run has a number of epochs: the schedules and the freeze plan are laid out over it."""
    max_epochs = trainer_arg(trainer, "max_epochs")
    if max_epochs == 0:
        raise ConfigError(
            "trainer.max_epochs=0 trains nothing: set it to 1 or more (eval.py evaluates a checkpoint)"
        )
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs={max_epochs!r} must be an integer >= 1: the learning-rate schedule is laid "
            "out over it (to stop earlier: callbacks=early_stopping, trainer.max_steps or trainer.max_time)"
        )
    if trainer_arg(trainer, "limit_train_batches") in (0, 0.0):
        raise ConfigError("trainer.limit_train_batches=0 trains nothing: leave it unset, or a fraction > 0")
    accumulate = trainer_arg(trainer, "accumulate_grad_batches")
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        # Lightning takes 0 and fails dividing by it when the schedule asks for the run's steps
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate!r} must be an integer >= 1 (batches per optimizer step)"
        )
    return max_epochs


def _check_validation(trainer: Mapping[str, Any], max_epochs: int, metric: str) -> None:
    """best.ckpt is chosen by a validation metric: the run must validate."""
    if trainer_arg(trainer, "limit_val_batches") in (0, 0.0):
        raise ConfigError(
            f"trainer.limit_val_batches=0 never validates, but best.ckpt is chosen by "
            f"optimized_metric={metric}: leave it unset, or a fraction > 0"
        )
    every = trainer_arg(trainer, "check_val_every_n_epoch")
    if isinstance(every, int) and every > max_epochs:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={max_epochs}: the run "
            f"would never validate, and best.ckpt is chosen by optimized_metric={metric}"
        )


def _check_warmup(scheduler: s.SchedulerConfig, max_epochs: int) -> None:
    """A warning, not an error: a one-epoch smoke test of the default config is legitimate."""
    if isinstance(scheduler, s.CosineScheduleConfig) and scheduler.warmup_epochs >= max_epochs:
        log.warning(
            "scheduler.warmup_epochs=%g is not below trainer.max_epochs=%d: the learning rate only warms "
            "up, it never reaches its cosine decay",
            scheduler.warmup_epochs,
            max_epochs,
        )


def _check_frozen_backbone(freeze: s.FreezeConfig, optim: s.OptimConfig) -> None:
    """Backbone learning-rate settings with a backbone that never trains would be silently ignored."""
    never_trains = isinstance(freeze, s.LinearProbeConfig) or (
        isinstance(freeze, s.PartialFinetuneConfig) and freeze.trainable_blocks == 0
    )
    if not never_trains:
        return
    for key in ("backbone_lr_mult", "layer_decay"):
        if s.is_set(optim, key):
            raise ConfigError(
                f"optim.{key}={getattr(optim, key)} has no effect: freeze={freeze.name} never trains the "
                f"backbone. Remove it, or choose freeze=full, partial or gradual"
            )
    if s.is_set(freeze, "bn"):
        raise ConfigError(
            f"freeze.bn={freeze.bn} has no effect: it sets batch norm in the stages that train, and "
            f"freeze={freeze.name} trains none (their batch norm keeps its statistics). Remove it"
        )


def _check_milestones(freeze: s.FreezeConfig, max_epochs: int) -> None:
    if isinstance(freeze, s.GradualUnfreezeConfig):
        last = freeze.milestones[-1]
        if last >= max_epochs:
            raise ConfigError(
                f"freeze.milestones={list(freeze.milestones)}: epoch {last} is past the last epoch "
                f"(trainer.max_epochs={max_epochs} trains epochs 0..{max_epochs - 1})"
            )
