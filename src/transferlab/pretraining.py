"""The pretraining job behind `pretrain.py`: a backbone learned from unlabelled images (an autoencoder,
or SimCLR), with training's data pipeline, loggers, checkpoints, DDP and resume; its checkpoint is a
`backbone.weights=` file for train.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from transferlab.backbones import get_source
from transferlab.build import (
    build_trainer,
    check_backbone,
    check_start_checkpoint,
    instantiate_group,
    preprocessing_for,
)
from transferlab.callbacks import ReconstructionImages
from transferlab.checkpoints import read_checkpoint
from transferlab.config import parse_pretrain_config
from transferlab.config.schema import AutoencoderConfig, PretrainConfig, SimCLRConfig
from transferlab.data.augment import contrastive_view
from transferlab.data.datamodule import TransferDataModule
from transferlab.errors import ConfigError
from transferlab.files import METRICS_FILE, write_json
from transferlab.launch import check_multirun_processes
from transferlab.models.pretrain import Pretrainer
from transferlab.models.speed import apply_speed_options, check_speed_options
from transferlab.resume import ReseedEachEpoch, start_checkpoint
from transferlab.runtime import is_multirun
from transferlab.training import finalizing, log_final_hparams, run_job

log = logging.getLogger(__name__)


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Fit; writes metrics.json (the best val/loss and the checkpoints) to the run directory and returns it."""
    return run_job(cfg, lambda output_dir, begin: _fit(parse_pretrain_config(cfg), output_dir, begin))


def check_pretrain_inputs(config: PretrainConfig) -> None:
    """The backbone has a feature map to learn from; its weights and the checkpoint to continue exist."""
    check_backbone(config.backbone)
    try:
        get_source(config.backbone.source).check_feature_map(config.backbone.name)
    except ConfigError:
        raise ConfigError(
            f"pretrain: backbone {config.backbone.name} has no spatial feature map transferlab knows, which "
            "pretraining learns: choose a CNN backbone (backbone=resnet18, resnet50, efficientnet_b0, "
            "mobilenet_v3_large, convnext_tiny, or a timm CNN)"
        ) from None
    check_start_checkpoint(config.ckpt_path, config.resume, config.trainer)
    if config.augment.mixup_alpha > 0 or config.augment.cutmix_alpha > 0:
        raise ConfigError(
            "augment.mixup_alpha / cutmix_alpha mix labels: pretraining has none, set them to 0"
        )


def check_same_pretraining(config: PretrainConfig) -> None:
    """`ckpt_path` continues a pretraining of this method and backbone (Lightning would stop loading
    its state with a wall of mismatched keys)."""
    hparams = read_checkpoint(config.ckpt_path, pretraining=True).get("hyper_parameters") or {}
    if not isinstance(hparams.get("method"), dict):
        raise ConfigError(
            f"ckpt_path={config.ckpt_path} is a classifier's checkpoint (train.py), not a pretraining one: "
            "pretrain continues only its own checkpoints; start without ckpt_path"
        )
    saved = (hparams["method"].get("name"), (hparams.get("backbone") or {}).get("name"))
    if saved != (config.method, config.backbone.name):
        raise ConfigError(
            f"ckpt_path={config.ckpt_path} is a pretraining of method={saved[0]} backbone={saved[1]}, and "
            f"this run's are method={config.method} backbone={config.backbone.name}: choose those to "
            "continue it, or start without ckpt_path"
        )


def build_pretrain_datamodule(config: PretrainConfig) -> TransferDataModule:
    """Training's data module; with method=simclr its train and val images are two random views each."""
    preprocessing = preprocessing_for(config.backbone, config.data)
    log.info("Preprocessing: %s", preprocessing)
    views = None
    if isinstance(config.method_config, SimCLRConfig):
        views = contrastive_view(
            preprocessing, config.method_config, config.data.allow_hflip, config.data.min_crop_scale
        )
    return TransferDataModule(config.data, preprocessing, config.seed, config.augment, views=views)


def _fit(config: PretrainConfig, output_dir: Path, begin: Callable[[], None]) -> dict[str, Any]:
    check_pretrain_inputs(config)
    check_multirun_processes(config.trainer, multirun=is_multirun())
    config = replace(config, ckpt_path=start_checkpoint(config.ckpt_path, output_dir))
    if config.ckpt_path:
        check_same_pretraining(config)
    loggers = instantiate_group(config.logger)
    callbacks = [*instantiate_group(config.callbacks), ReseedEachEpoch(config.seed)]
    if isinstance(config.method_config, AutoencoderConfig):
        callbacks.append(ReconstructionImages())
    trainer = build_trainer(config.trainer, callbacks, loggers)  # Lightning checks its arguments: before data
    L.seed_everything(config.seed, workers=True)
    datamodule = build_pretrain_datamodule(config)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = Pretrainer(
        backbone=asdict(config.backbone),
        method=asdict(config.method_config),
        optim=asdict(config.optim),
        scheduler=asdict(config.scheduler),
        preprocessing=datamodule.preprocessing.to_dict(),
    )
    if not config.ckpt_path:
        model.load_pretrained_backbone()
    check_speed_options(
        model, config.model, datamodule.preprocessing.crop_size, trainer.strategy.root_device.type
    )
    apply_speed_options(model, config.model)
    begin()
    with finalizing(loggers):
        if trainer.is_global_zero:
            datamodule.write_run_files(output_dir)
        trainer.fit(model, datamodule=datamodule, ckpt_path=config.ckpt_path)
        metrics = _results(trainer, output_dir)
        if trainer.is_global_zero:
            write_json(output_dir / METRICS_FILE, metrics)
            log_final_hparams(loggers, {"method": config.method, "backbone": config.backbone.name}, metrics)
        log.info(
            "Pretrained %s (%s): best val/loss %s. Fine-tune it: train.py backbone.weights=%s",
            config.backbone.name,
            config.method,
            metrics["val/loss"],
            metrics["best_ckpt"] or metrics["last_ckpt"],
        )
        return metrics


def _results(trainer: L.Trainer, output_dir: Path) -> dict[str, Any]:
    monitoring = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    best = monitoring[0] if monitoring else None
    last = output_dir / "checkpoints" / "last.ckpt"
    score = best.best_model_score if best is not None else trainer.callback_metrics.get("val/loss")
    return {
        "val/loss": float(score) if score is not None else None,
        "best_ckpt": (best.best_model_path or None) if best is not None else None,
        "last_ckpt": str(last) if last.is_file() else None,
        "epochs_trained": trainer.current_epoch,
    }
