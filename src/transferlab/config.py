"""Validate a composed config before anything is built, with errors that name the key and the choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferlab.data.augment import check_augment
from transferlab.data.datasets import DATASETS, EMPTY_CLASS_POLICIES
from transferlab.data.imbalance import check_imbalance
from transferlab.data.scan import SCAN_MODES
from transferlab.errors import ConfigError
from transferlab.finetune.freeze import check_freeze
from transferlab.finetune.lr_find import check_tune
from transferlab.finetune.optim import SCHEDULERS, check_optim
from transferlab.models.backbones import check_backbone_name, is_weights_file, torchvision_weights


def to_plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts, lists, numbers, strings)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _check_weights(backbone: DictConfig) -> None:
    weights = backbone.get("weights")
    if weights is None:
        return
    if not is_weights_file(str(weights)):
        if backbone.source == "torchvision":
            torchvision_weights(backbone.name, str(weights))  # a weights name the model has
    elif not Path(str(weights)).expanduser().is_file():
        raise ConfigError(f"backbone.weights={weights}: no such file")


def _positive(value: Any, key: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def validate_data(data: DictConfig) -> None:
    if data.get("name") not in DATASETS:
        raise ConfigError(
            f"data.name={data.get('name')!r} is not valid; choose one of: {', '.join(DATASETS)}"
        )
    _positive(data.get("batch_size"), "data.batch_size", allow_none=False)
    _positive(data.get("shots"), "data.shots")
    _positive(data.get("image_size"), "data.image_size")
    _positive(data.get("max_image_pixels"), "data.max_image_pixels")
    check_imbalance(data.get("imbalance") or "none")
    _choice(data.get("scan") or "fast", "data.scan", SCAN_MODES)
    _choice(data.get("empty_classes") or "error", "data.empty_classes", EMPTY_CLASS_POLICIES)
    if not isinstance(data.get("skip_bad") or False, bool):
        raise ConfigError(f"data.skip_bad={data.get('skip_bad')!r} must be true or false")
    val, test = data.get("val_fraction"), data.get("test_fraction") or 0.0
    if val is not None and (not 0 < val < 1 or not 0 <= test < 1 or val + test >= 1):
        raise ConfigError(
            f"data.val_fraction={val} and data.test_fraction={test}: each must be in [0, 1) (val > 0), "
            "their sum below 1"
        )
    crop = data.get("min_crop_scale")
    if crop is not None and not 0 < crop <= 1:
        raise ConfigError(f"data.min_crop_scale={crop} must be in (0, 1]")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def validate_train_config(cfg: DictConfig) -> None:
    """Every check that can run before data or models are loaded."""
    check_backbone_name(cfg.backbone.source, cfg.backbone.name)
    _check_weights(cfg.backbone)
    check_optim(to_plain(cfg.optim))
    if cfg.scheduler.get("name") not in SCHEDULERS:
        raise ConfigError(
            f"scheduler.name={cfg.scheduler.get('name')!r} is not valid; choose one of: {', '.join(SCHEDULERS)}"
        )
    check_freeze(to_plain(cfg.freeze), max_epochs=cfg.trainer.get("max_epochs"))
    validate_data(cfg.data)
    check_augment(to_plain(cfg.augment))
    check_tune(to_plain(cfg.tune))
    smoothing = cfg.loss.get("label_smoothing", 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing={smoothing} must be in [0, 1)")
    if cfg.loss.get("focal_gamma", 2.0) < 0:
        raise ConfigError(f"loss.focal_gamma={cfg.loss.focal_gamma} must be >= 0")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such file")
    _check_scale_options(cfg)


def _check_scale_options(cfg: DictConfig) -> None:
    if cfg.get("optimized_mode", "max") not in ("max", "min"):
        raise ConfigError(f"optimized_mode={cfg.optimized_mode!r} is not valid; choose one of: max, min")
    for key, value in (cfg.get("model") or {}).items():
        if not isinstance(value, bool):
            raise ConfigError(f"model.{key}={value!r} must be true or false")
