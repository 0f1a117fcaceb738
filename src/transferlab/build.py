"""The pieces of a run, built from the parsed config the same way by training, evaluation, the tools
and the benchmarks: the data module, the model, loggers and callbacks, the trainer."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import Logger

from transferlab.backbones import get_source, is_weights_file
from transferlab.callbacks import ConfusionMatrixImage
from transferlab.config.schema import AugmentConfig, BackboneConfig, DataConfig, TrainConfig
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.models.classifier import ImageClassifier

log = logging.getLogger(__name__)


def check_run_inputs(config: TrainConfig) -> None:
    """What must exist before a run starts: the backbone and its weights, the checkpoint to start from."""
    backbone = config.backbone
    source = get_source(backbone.source)
    source.check_available()
    source.check_name(backbone.name)
    weights = backbone.weights
    if weights is not None and is_weights_file(weights):
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"backbone.weights={weights}: no such file")
    elif weights is not None:
        source.check_weights(backbone.name, weights)
    if config.ckpt_path and not Path(config.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={config.ckpt_path}: no such file")


def preprocessing_for(backbone: BackboneConfig, data: DataConfig) -> Preprocessing:
    """What the backbone's weights expect, then `data.image_size/mean/std/interpolation` on top."""
    weights = get_source(backbone.source).preprocessing(backbone.name, backbone.weights)
    return weights.with_overrides(
        image_size=data.image_size, mean=data.mean, std=data.std, interpolation=data.interpolation
    )


def build_datamodule(
    data: DataConfig, backbone: BackboneConfig, seed: int, augment: AugmentConfig | None = None
) -> TransferDataModule:
    preprocessing = preprocessing_for(backbone, data)
    log.info("Preprocessing: %s", preprocessing)
    return TransferDataModule(data, preprocessing, seed=seed, augment=augment)


def loss_spec(config: TrainConfig, datamodule: TransferDataModule) -> dict[str, Any]:
    """`loss.*` plus what `data.imbalance` asks of the loss: class weights from the training counts, or
    the focal loss. (`sampler` changes what the loader draws, not the loss.)"""
    return {
        **asdict(config.loss),
        "name": "focal" if datamodule.imbalance == "focal" else "cross_entropy",
        "class_weights": datamodule.class_weights() if datamodule.imbalance == "class_weights" else None,
    }


def build_model(
    config: TrainConfig, class_names: list[str], preprocessing: Preprocessing, loss: dict[str, Any] | None
) -> ImageClassifier:
    """A classifier for these classes, random init (pretrained weights: `load_pretrained_backbone`)."""
    return ImageClassifier(
        backbone=asdict(config.backbone),
        head=asdict(config.head),
        num_classes=len(class_names),
        class_names=list(class_names),
        optim=asdict(config.optim),
        scheduler=asdict(config.scheduler),
        freeze=asdict(config.freeze),
        preprocessing=preprocessing.to_dict(),
        loss=loss,
    )


def instantiate_group(group: dict[str, Any] | None) -> list[Any]:
    """Each `_target_` entry of a `callbacks/` or `logger/` config, instantiated; None entries dropped."""
    if not group:
        return []
    built = [instantiate(node) for node in group.values() if isinstance(node, dict) and "_target_" in node]
    return [obj for obj in built if obj is not None]


def build_trainer(trainer: dict[str, Any], callbacks: list[Callback], loggers: list[Logger]) -> L.Trainer:
    """Lightning's Trainer from `trainer.*`, with our callbacks and the confusion-matrix image."""
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    return instantiate(
        trainer,
        callbacks=[*callbacks, ConfusionMatrixImage()],
        logger=loggers or False,
        enable_progress_bar=has_bar,
    )
