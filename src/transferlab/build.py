"""The pieces of a run, built from the parsed config the same way by training, evaluation, the tools
and the benchmarks: the data module, the model, loggers and callbacks, the trainer."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from transferlab.backbones import get_source, is_weights_file
from transferlab.callbacks import ConfusionMatrixImage
from transferlab.checkpoints import (
    check_checkpoint_classes,
    check_is_file,
    read_checkpoint,
    stored_hyperparameters,
)
from transferlab.config.parse import trainer_arg
from transferlab.config.schema import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    DistillConfig,
    PlateauScheduleConfig,
    TrainConfig,
)
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import USER_ERRORS, ConfigError, first_line
from transferlab.models.classifier import ImageClassifier
from transferlab.models.distill import Teacher
from transferlab.models.heads import pools_feature_map
from transferlab.models.metrics import TOP5_MIN_CLASSES
from transferlab.resume import check_epochs_left

log = logging.getLogger(__name__)
LIGHTNING_INFO = "lightning.pytorch"  # the logger of Lightning's info lines (rank_zero_info: devices, ...)


class _NoAdverts(logging.Filter):
    """Lightning's Trainer logs a "Tip" advertising its cloud services (LitLogger, litmodels) in every run
    that does not use them: nothing a user of this tool can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


_NO_ADVERTS = _NoAdverts()


def check_run_inputs(config: TrainConfig) -> None:
    """What must exist before a run starts: the backbone and its weights, the checkpoint to start from."""
    check_backbone(config.backbone, feature_map=pools_feature_map(config.head._target_))
    if config.init_from is not None:
        check_is_file(config.init_from, "init_from")
    if config.distill.teacher is not None:  # read whole later, once the data's classes are known
        check_is_file(config.distill.teacher, "distill.teacher")
    check_start_checkpoint(config.ckpt_path, config.resume, config.trainer)


def check_start_checkpoint(ckpt_path: str | None, resume: str | None, trainer: dict[str, Any]) -> None:
    """`ckpt_path` (or resume's last checkpoint) exists and has epochs left to train."""
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such file")
    if ckpt_path:
        key = f"resume={resume}: its last checkpoint" if resume else "ckpt_path"
        check_epochs_left(ckpt_path, trainer_arg(trainer, "max_epochs"), key)


def check_backbone(backbone: BackboneConfig, feature_map: bool = False) -> None:
    """The backbone exists (and has a feature map, when one is needed); its weights name or file does."""
    source = get_source(backbone.source)
    source.check_available()
    source.check_name(backbone.name)
    if feature_map:
        source.check_feature_map(backbone.name)
    weights = backbone.weights
    if backbone.trust_file and (weights is None or not is_weights_file(weights)):
        raise ConfigError(
            f"backbone.trust_file=true is read only for a local weights file; backbone.weights={weights}"
        )
    if weights is not None and is_weights_file(weights):
        if Path(weights).expanduser().is_dir():
            raise ConfigError(f"backbone.weights={weights} is a directory: give the weights file in it")
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"backbone.weights={weights}: no such file")
        check_weights_architecture(backbone)
    elif weights is not None:
        source.check_weights(backbone.name, weights)


def check_weights_architecture(backbone: BackboneConfig) -> None:
    """A checkpoint of ours (a training or a pretraining run) given as `backbone.weights` must hold the
    same architecture: refused here, naming both, rather than as a list of mismatched tensors."""
    held = (stored_hyperparameters(backbone.weights) or {}).get("backbone")
    if isinstance(held, dict) and (held.get("source"), held.get("name")) != (backbone.source, backbone.name):
        raise ConfigError(
            f"backbone.weights={backbone.weights} holds a {held.get('source')} {held.get('name')}, but "
            f"backbone is {backbone.source} {backbone.name}: use backbone.name={held.get('name')} (and "
            f"backbone.source={held.get('source')}), or weights saved from {backbone.name}"
        )


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


def load_teacher(distill: DistillConfig, class_names: list[str], preprocessing: Preprocessing) -> Teacher:
    """`distill.teacher`: the checkpoint's network, frozen in eval mode, refused unless it was trained on
    exactly these classes in this order (its logits are targets for the student's, class by class)."""
    checkpoint = read_checkpoint(
        distill.teacher, distill.trust_teacher, "distill.teacher", "distill.trust_teacher"
    )
    check_checkpoint_classes(checkpoint, distill.teacher, class_names, key="distill.teacher")
    network = ImageClassifier.from_checkpoint(checkpoint)
    teacher_preprocessing = checkpoint["hyper_parameters"]["preprocessing"]
    log.info(
        "Distilling from %s (backbone %s, %d px) with alpha=%s, temperature=%s",
        distill.teacher,
        checkpoint["hyper_parameters"]["backbone"]["name"],
        teacher_preprocessing["crop_size"],
        distill.alpha,
        distill.temperature,
    )
    return Teacher(network, preprocessing.to_dict(), teacher_preprocessing)


def build_model(
    config: TrainConfig,
    class_names: list[str],
    preprocessing: Preprocessing,
    loss: dict[str, Any] | None,
    pruned: dict[str, Any] | None = None,
) -> ImageClassifier:
    """A classifier for these classes, random init (pretrained weights: `load_pretrained_backbone`),
    checked to take the input size and to log the metrics the run monitors; `pruned`: the layer widths
    of a channel-pruned network (`init_from` of a pruned checkpoint)."""
    check_monitored_metrics(config, len(class_names))
    model = ImageClassifier(
        backbone=asdict(config.backbone),
        head=asdict(config.head),
        num_classes=len(class_names),
        class_names=list(class_names),
        optim=asdict(config.optim),
        scheduler=asdict(config.scheduler),
        freeze=asdict(config.freeze),
        preprocessing=preprocessing.to_dict(),
        loss=loss,
        pruned=pruned,
    )
    check_input_size(model, preprocessing.crop_size, config.backbone.name)
    return model


def check_monitored_metrics(config: TrainConfig, num_classes: int) -> None:
    """acc_top5 is logged only with more than 5 classes (`models.metrics`), known once the data is read."""
    monitored = {"optimized_metric": config.optimized_metric}
    if isinstance(config.scheduler, PlateauScheduleConfig):
        monitored["scheduler.monitor"] = config.scheduler.monitor
    for key, metric in monitored.items():
        if metric.endswith("/acc_top5") and num_classes <= TOP5_MIN_CLASSES:
            raise ConfigError(
                f"{key}={metric} is logged only with more than {TOP5_MIN_CLASSES} classes; this data has "
                f"{num_classes}: choose val/acc"
            )


def check_input_size(model: ImageClassifier, size: int, backbone: str) -> None:
    """One blank image through the network before any training: a size the backbone cannot take fails
    here, in one line, not at the first batch. Module modes are restored; no statistics change."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"data.image_size={size} does not fit backbone {backbone} ({reason}): choose another "
            "data.image_size, or leave it unset for the size its weights expect"
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training


def instantiate_group(group: dict[str, Any] | None) -> list[Any]:
    """Each `_target_` entry of a `callbacks/` or `logger/` config, instantiated; None entries dropped."""
    if not group:
        return []
    built = []
    for key, node in group.items():
        if isinstance(node, dict) and "_target_" in node:
            try:
                built.append(instantiate(node))
            except InstantiationException as error:  # our factories' refusals, e.g. callbacks.progress.mode
                if isinstance(error.__cause__, USER_ERRORS):
                    raise error.__cause__ from None
                if isinstance(error.__cause__, TypeError):  # an argument the class does not take: a typo
                    raise ConfigError(
                        f"{key} ({node['_target_']}): {first_line(error.__cause__)}; check the spelling of "
                        f"the keys given under {key}"
                    ) from None
                raise
    return [obj for obj in built if obj is not None]


def build_trainer(trainer: dict[str, Any], callbacks: list[Callback], loggers: list[Logger]) -> L.Trainer:
    """Lightning's Trainer from `trainer.*`, with our callbacks and the confusion-matrix image."""
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    logging.getLogger(f"{LIGHTNING_INFO}.utilities.rank_zero").addFilter(_NO_ADVERTS)  # once: same object
    # Lightning 2.6's own code calls torch's deprecated pytree API (Lightning-AI/pytorch-lightning#21326)
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    try:
        return instantiate(
            trainer,
            callbacks=[*callbacks, ConfusionMatrixImage()],
            logger=loggers or False,
            enable_progress_bar=has_bar,
        )
    except InstantiationException as error:  # Lightning's own check of its arguments (accelerator, ...)
        cause = error.__cause__
        if isinstance(cause, MisconfigurationException | ValueError | TypeError):
            reason = " ".join(str(cause).split())
            raise ConfigError(
                f"trainer: {reason} (the trainer.* keys are lightning.Trainer's arguments)"
            ) from None
        raise
