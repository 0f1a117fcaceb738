"""The training job behind `train.py`: compose data, model, loggers and callbacks, fit, test, report."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from transferlab.config import to_plain, validate_train_config
from transferlab.data.datamodule import TransferDataModule
from transferlab.finetune.lr_find import find_lr
from transferlab.models.backbones import preprocessing_for
from transferlab.models.checkpoints import check_checkpoint_classes, read_checkpoint
from transferlab.models.classifier import ImageClassifier
from transferlab.rundir import write_json

log = logging.getLogger(__name__)


def build_datamodule(
    data: DictConfig, backbone: DictConfig, seed: int, augment: DictConfig | None = None
) -> TransferDataModule:
    """Preprocessing follows the backbone's weights, then `data.image_size/mean/std/interpolation`."""
    preprocessing = preprocessing_for(backbone.source, backbone.name, backbone.get("weights")).with_overrides(
        image_size=data.get("image_size"),
        mean=data.get("mean"),
        std=data.get("std"),
        interpolation=data.get("interpolation"),
    )
    log.info("Preprocessing: %s", preprocessing)
    return TransferDataModule(to_plain(data), preprocessing, seed=seed, augment=to_plain(augment))


def loss_config(cfg: DictConfig, datamodule: TransferDataModule) -> dict[str, Any]:
    """`loss.*` plus what `data.imbalance` asks of the loss: class weights from the training counts, or
    the focal loss. (`sampler` changes what the loader draws, not the loss.)"""
    imbalance = cfg.data.get("imbalance") or "none"
    return {
        **to_plain(cfg.loss),
        "name": "focal" if imbalance == "focal" else "cross_entropy",
        "class_weights": datamodule.class_weights() if imbalance == "class_weights" else None,
    }


def build_model(cfg: DictConfig, datamodule: TransferDataModule) -> ImageClassifier:
    """A classifier whose head matches the data's classes; pretrained weights loaded unless resuming."""
    model = ImageClassifier(
        backbone=to_plain(cfg.backbone),
        head=to_plain(cfg.head),
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        optim=to_plain(cfg.optim),
        scheduler=to_plain(cfg.scheduler),
        freeze=to_plain(cfg.freeze),
        preprocessing=datamodule.preprocessing.to_dict(),
        loss=loss_config(cfg, datamodule),
    )
    if cfg.get("ckpt_path"):
        check_checkpoint_classes(read_checkpoint(cfg.ckpt_path), cfg.ckpt_path, datamodule.class_names)
    else:
        model.load_pretrained_backbone(
            cfg.backbone.get("weights"), trust_file=bool(cfg.backbone.get("trust_file", False))
        )
    return model


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Each `_target_` entry of a `callbacks/` or `logger/` config, instantiated; None entries dropped."""
    if not group:
        return []
    built = [
        instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node
    ]
    return [obj for obj in built if obj is not None]


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> L.Trainer:
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_progress_bar=has_bar)


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{key}/{name}" if key else str(name))
        else:
            flat[key] = node if isinstance(node, int | float | str | bool) else str(node)

    walk(plain, "")
    return flat


def final_metrics(
    trainer: L.Trainer, model: ImageClassifier, datamodule: TransferDataModule, test: bool
) -> dict[str, Any]:
    """Validate (and test) the best checkpoint; the logged values, the confusion matrix, and where it is."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    ckpt_path = "best" if best else None
    metrics: dict[str, Any] = {}
    for result in trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False):
        metrics.update(result)
    if test and datamodule.has_split("test"):
        for result in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False):
            metrics.update(result)
        metrics["test/confusion_matrix"] = model.test_confusion.tolist()
        log.info("%s", per_class_recall_table(metrics, datamodule.class_counts()))
    elif test:
        log.warning("The data has no test split: reporting validation metrics only.")
    metrics.update(
        {
            "best_ckpt": best,
            "epochs_trained": trainer.current_epoch,
            "class_names": datamodule.class_names,
            "class_counts": datamodule.class_counts(),
        }
    )
    return metrics


def per_class_recall_table(metrics: dict[str, Any], counts: dict[str, dict[str, int]]) -> str:
    """Test recall of each class (`test/acc_class/<name>`: the share of its images predicted right) next
    to its image counts, so that what imbalance does to the rare classes shows at the end of a run."""
    names = list(counts["train"])
    width = max([5, *map(len, names)])
    lines = ["Per-class test recall:", "  " + "class".ljust(width) + "  recall   train    test"]
    for name in names:
        recall = float(metrics[f"test/acc_class/{name}"])
        lines.append(
            f"  {name.ljust(width)}  {recall:6.3f}{counts['train'][name]:8d}{counts['test'][name]:8d}"
        )
    return "\n".join(lines)


def log_class_counts(loggers: list[Logger], counts: dict[str, dict[str, int]]) -> None:
    """Images per class and split as scalars at step 0 (`data/train_count/<class>`), so imbalance shows."""
    values = {
        f"data/{split}_count/{name}": n
        for split, per_class in counts.items()
        for name, n in per_class.items()
    }
    for logger in loggers:
        logger.log_metrics(values, step=0)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then evaluate the best checkpoint; writes metrics.json to the run directory and returns it."""
    validate_train_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, cfg.backbone, cfg.seed, cfg.augment)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg, datamodule)
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_group(cfg.get("callbacks")), loggers)
    status = "failed"
    try:
        if trainer.is_global_zero:
            datamodule.write_run_files(output_dir)
            log_class_counts(loggers, datamodule.class_counts())
        if cfg.tune.get("lr_find") and not cfg.get("ckpt_path"):
            cfg.optim.lr = find_lr(trainer, model, datamodule, to_plain(cfg.tune), output_dir, loggers)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = final_metrics(trainer, model, datamodule, test=bool(cfg.get("test_after_fit", True)))
        if trainer.is_global_zero:
            write_json(output_dir / "metrics.json", metrics)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and "/" in k}
            for logger in loggers:
                logger.log_hyperparams(_flat_hparams(cfg), metrics=scalars)
        log.info("Run directory: %s", output_dir)
        status = "success"
        return metrics
    except BaseException:
        if trainer.is_global_zero:  # the run directory stays readable: config, logs, checkpoints, the error
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        for logger in loggers:
            logger.finalize(status)
