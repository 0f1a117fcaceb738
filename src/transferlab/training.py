"""The training job behind `train.py`: compose data, model, loggers and callbacks, fit, test, report."""

from __future__ import annotations

import logging
import signal
import traceback
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transferlab.config import to_plain, validate_train_config
from transferlab.data.datamodule import TransferDataModule
from transferlab.distributed import check_multirun_processes
from transferlab.finetune.lr_find import find_lr
from transferlab.models.backbones import preprocessing_for
from transferlab.models.checkpoints import check_checkpoint_classes, read_checkpoint
from transferlab.models.classifier import ImageClassifier
from transferlab.resume import ReseedEachEpoch, start_checkpoint
from transferlab.rundir import is_multirun, write_json
from transferlab.speed import apply_speed_options

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
    return {
        **to_plain(cfg.loss),
        "name": "focal" if datamodule.imbalance == "focal" else "cross_entropy",
        "class_weights": datamodule.class_weights() if datamodule.imbalance == "class_weights" else None,
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
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
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


def log_final_hparams(loggers: list[Logger], hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The run's config with its final metrics: TensorBoard's HPARAMS tab pairs them; other loggers
    (CSV) take no metrics in log_hyperparams."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and "/" in k}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics=scalars)
        else:
            logger.log_hyperparams(hparams)


def final_metrics(
    trainer: L.Trainer, model: ImageClassifier, datamodule: TransferDataModule, test: bool
) -> dict[str, Any]:
    """Validate (and test) the best checkpoint; the logged values, the confusion matrix, and where it is."""
    # the checkpoint callback that monitors optimized_metric (the other one writes last.ckpt)
    monitoring = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    best = monitoring[0].best_model_path if monitoring and monitoring[0].best_model_path else None
    metrics: dict[str, Any] = {}
    for result in trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False):
        metrics.update(result)
    if test and datamodule.has_split("test"):
        for result in trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False):
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
    """Fit, then evaluate the best checkpoint; writes metrics.json to the run directory and returns it.

    Any failure, from config validation on, leaves its traceback in error.txt (sweep summaries list it).
    """
    output_dir = Path(cfg.paths.output_dir)
    try:
        return _fit_and_evaluate(cfg, output_dir)
    except BaseException as error:
        if rank_zero_only.rank == 0:  # the run directory stays readable: config, logs, checkpoints, the error
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "error.txt").write_text(traceback.format_exc())
        if isinstance(error, SIGTERMException):  # a SystemExit with status 0, as if the run had succeeded
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


def _fit_and_evaluate(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    validate_train_config(cfg)
    check_multirun_processes(cfg.trainer, multirun=is_multirun())
    cfg.ckpt_path = start_checkpoint(cfg.get("ckpt_path"), output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, cfg.backbone, cfg.seed, cfg.augment)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg, datamodule)
    apply_speed_options(model, to_plain(cfg.get("model")))
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = [*instantiate_group(cfg.get("callbacks")), ReseedEachEpoch(cfg.seed)]
    trainer = build_trainer(cfg, callbacks, loggers)
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
            log_final_hparams(loggers, _flat_hparams(cfg), metrics)
        log.info("Run directory: %s", output_dir)
        status = "success"
        return metrics
    finally:
        for logger in loggers:
            logger.finalize(status)
