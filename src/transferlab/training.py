"""The training job behind `train.py`: parse the config, build data, model, loggers and callbacks, fit,
evaluate the best checkpoint, report."""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from transferlab.build import (
    build_datamodule,
    build_model,
    build_trainer,
    check_run_inputs,
    instantiate_group,
    load_teacher,
    loss_spec,
)
from transferlab.checkpoints import (
    check_checkpoint_classes,
    read_checkpoint,
    stored_hyperparameters,
    stored_val_metrics,
)
from transferlab.config import TrainConfig, parse_train_config
from transferlab.config.parse import backbone_never_trains
from transferlab.data.datamodule import TransferDataModule
from transferlab.errors import ConfigError
from transferlab.files import (
    ERROR_FILE,
    METRICS_FILE,
    atomic_write,
    keep_earlier,
    leave_run_as_it_was,
    save_traceback,
    write_json,
)
from transferlab.finetune.averaging import EMAWeights
from transferlab.finetune.bn_fit import MEASURED_BATCHES, SHIFT_THRESHOLD, adapted_bn_mode, statistics_shift
from transferlab.finetune.feature_cache import FeatureCache, use_feature_cache
from transferlab.finetune.lr_find import find_lr
from transferlab.launch import check_multirun_processes
from transferlab.models.calibration import calibrate
from transferlab.models.classifier import ImageClassifier
from transferlab.models.speed import apply_speed_options, check_speed_options
from transferlab.resume import ReseedEachEpoch, start_checkpoint
from transferlab.runtime import is_multirun

log = logging.getLogger(__name__)


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    plain = asdict(config)
    flat: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{key}/{name}" if key else str(name))
        else:
            flat[key] = node if isinstance(node, int | float | str | bool) else str(node)

    walk(plain, "")
    return flat


@contextlib.contextmanager
def finalizing(loggers: list[Logger]) -> Iterator[None]:
    """The loggers closed at the end of the block with the run's status: "success" when it ends normally
    (a return included), "failed" when it raises."""
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for logger in loggers:
            logger.finalize(status)


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
    # read by rank 0 and sent to the others: it waited for its background checkpoint writes when fit ended
    stored = stored_val_metrics(best) if best and trainer.is_global_zero else None
    metrics: dict[str, Any] = dict(trainer.strategy.broadcast(stored) or {})
    if not metrics:  # no best checkpoint (the last weights), or one saved without its validation
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


def calibrate_best_checkpoint(
    model: ImageClassifier, datamodule: TransferDataModule, best: str | None
) -> dict[str, Any]:
    """Fit a temperature on the val split to the best checkpoint's logits and store it in that
    checkpoint (checkpoint["calibration"], rewritten atomically): predict, export and analyze use it."""
    if best is None:  # parse refuses calibrate=true without the callback; it saved nothing (no val epoch)
        raise ConfigError("calibrate=true: the run saved no best.ckpt to calibrate")
    state = read_checkpoint(best)
    model.load_state_dict(state["state_dict"])
    logits, targets = model.logits_of(datamodule.val_dataloader())
    calibration = calibrate(logits, targets, split="val").to_dict()
    state["calibration"] = calibration
    atomic_write(best, lambda f: torch.save(state, f))
    log.info(
        "Calibration on val (%d images): temperature %.3f; NLL %.4f -> %.4f, ECE %.4f -> %.4f (stored in %s)",
        calibration["images"],
        calibration["temperature"],
        calibration["nll_before"],
        calibration["nll_after"],
        calibration["ece_before"],
        calibration["ece_after"],
        best,
    )
    return calibration


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
    A continued run (resume=, a SLURM requeue) renames the earlier attempt's error.txt and metrics.json
    (`files.keep_earlier`) once its checks have passed (`run_job`): kept, but neither is taken for this
    attempt's outcome.
    """
    return run_job(
        cfg, lambda output_dir, begin: _fit_and_evaluate(parse_train_config(cfg), output_dir, begin)
    )


def run_job(cfg: DictConfig, job: Callable[[Path, Callable[[], None]], dict[str, Any]]) -> dict[str, Any]:
    """`job(output_dir, begin)` with what every run keeps: any failure's traceback in error.txt, and SIGTERM
    reported as a failure (`train`). The job calls `begin()` once its checks (config, resume point) have
    passed: an earlier attempt's error.txt and metrics.json are put aside then. A failure before that in
    a finished run (its metrics.json there) writes no error.txt: a refused resume= must not turn it into
    a failed one. An earlier attempt that failed (a SLURM requeue, a resume after a crash) gets this
    attempt's error.txt, its own kept aside."""
    output_dir = Path(cfg.paths.output_dir)
    begun = False

    def begin() -> None:
        nonlocal begun
        for name in (ERROR_FILE, METRICS_FILE) if rank_zero_only.rank == 0 else ():
            if (kept := keep_earlier(output_dir, name)) is not None:
                log.info("The earlier attempt's %s is kept as %s", name, kept.name)
        begun = True

    try:
        return job(output_dir, begin)
    except BaseException as error:
        if not begun and (output_dir / METRICS_FILE).exists():  # a finished run, resumed: refused
            leave_run_as_it_was(error, output_dir)  # the tool saves no error.txt there either
        elif rank_zero_only.rank == 0:
            # the run directory stays readable: config, logs, checkpoints, the error; on a full disk it
            # cannot be saved: the error raised stays the one the user sees (the tool tries again, and tells)
            with contextlib.suppress(OSError):
                save_traceback(output_dir, error)
        if isinstance(error, SIGTERMException):  # a SystemExit with status 0, as if the run had succeeded
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


def _fit_and_evaluate(config: TrainConfig, output_dir: Path, begin: Callable[[], None]) -> dict[str, Any]:
    check_run_inputs(config)
    check_multirun_processes(config.trainer, multirun=is_multirun())
    config = replace(config, ckpt_path=start_checkpoint(config.ckpt_path, output_dir))
    loggers = instantiate_group(config.logger)
    callbacks = [*instantiate_group(config.callbacks), ReseedEachEpoch(config.seed)]
    if config.ema.enabled:  # validated and checkpointed: the average is the model users get
        callbacks.append(EMAWeights(config.ema))
    trainer = build_trainer(config.trainer, callbacks, loggers)  # Lightning checks its arguments: before data
    L.seed_everything(config.seed, workers=True)
    datamodule = build_datamodule(config.data, config.backbone, config.seed, config.augment)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = prepare_model(config, datamodule)
    check_speed_options(
        model, config.model, datamodule.preprocessing.crop_size, trainer.strategy.root_device.type
    )
    apply_speed_options(model, config.model)
    if use_feature_cache(config, model.backbone, trainer.world_size):
        # fit (and the LR finder's), validate and test: the head on the backbone's features, computed when a
        # loader first asks for them (after a checkpoint is restored); checkpoints hold the whole network
        datamodule.feature_cache = FeatureCache(model)
        model.inputs_are_features = True
    begin()
    with finalizing(loggers):
        if trainer.is_global_zero:
            datamodule.write_run_files(output_dir)
            log_class_counts(loggers, datamodule.class_counts())
        if config.tune.lr_find and not config.ckpt_path:
            lr = find_lr(trainer, model, datamodule, config.tune, output_dir, loggers)
            config = replace(config, optim=replace(config.optim, lr=lr))
        trainer.fit(model, datamodule=datamodule, ckpt_path=config.ckpt_path)
        metrics = final_metrics(trainer, model, datamodule, test=config.test_after_fit)
        if config.calibrate and trainer.is_global_zero:
            metrics["calibration"] = calibrate_best_checkpoint(model, datamodule, metrics["best_ckpt"])
        if trainer.is_global_zero:
            write_json(output_dir / METRICS_FILE, metrics)
            log_final_hparams(loggers, _flat_hparams(config), metrics)
        log.info("Run directory: %s", output_dir)
        return metrics


def prepare_model(config: TrainConfig, datamodule: TransferDataModule) -> ImageClassifier:
    """A classifier whose head matches the data's classes; pretrained weights loaded unless resuming."""
    start = read_checkpoint(config.init_from, key="init_from") if config.init_from else None
    if start is not None:
        check_init_from(start, config, datamodule.class_names)
    # the layer widths of a channel-pruned network: from where the weights come (init_from, or the
    # checkpoint a run continues from: resume= of a run that started from a pruned one)
    origin = start["hyper_parameters"] if start is not None else None
    if origin is None and config.ckpt_path:
        origin = stored_hyperparameters(config.ckpt_path)
    pruned = (origin or {}).get("pruned")
    model = build_model(
        config, datamodule.class_names, datamodule.preprocessing, loss_spec(config, datamodule), pruned
    )
    if config.distill.teacher is not None:  # also when resuming: the teacher is in no checkpoint
        teacher = load_teacher(config.distill, datamodule.class_names, datamodule.preprocessing)
        model.set_teacher(teacher, config.distill.alpha, config.distill.temperature)
    if start is not None:  # its network and weights; optimizer, schedule and epochs start anew
        model.load_state_dict(start["state_dict"])
        log.info(
            "init_from: the network and weights of %s (backbone.weights is not loaded)", config.init_from
        )
        keep_measured_bn_mode(model, config, start)
    elif config.ckpt_path:
        checkpoint = read_checkpoint(config.ckpt_path)
        check_checkpoint_classes(checkpoint, config.ckpt_path, datamodule.class_names)
        keep_measured_bn_mode(model, config, checkpoint)
    else:
        model.load_pretrained_backbone()
        measure = config.freeze.bn == "adapt" and config.backbone.weights is not None
        if measure and not backbone_never_trains(config.freeze):  # a frozen backbone keeps its statistics
            adapt_batch_norm(model, datamodule)
    return model


def keep_measured_bn_mode(model: ImageClassifier, config: TrainConfig, checkpoint: dict[str, Any]) -> None:
    """freeze.bn=adapt from a checkpoint: what its run measured at its start, not a new measurement on
    weights that already fit these images."""
    stored = checkpoint["hyper_parameters"].get("freeze", {}).get("bn")
    if config.freeze.bn == "adapt" and stored in ("train", "eval"):
        model.set_bn_mode(stored)


def check_init_from(checkpoint: dict[str, Any], config: TrainConfig, class_names: list[str]) -> None:
    """init_from: the same classes (in order) and the same backbone as this run's config."""
    backbone = checkpoint["hyper_parameters"]["backbone"]
    if (backbone["source"], backbone["name"]) != (config.backbone.source, config.backbone.name):
        raise ConfigError(
            f"init_from={config.init_from} holds a {backbone['source']} {backbone['name']}, but this run's "
            f"backbone is {config.backbone.source} {config.backbone.name}: use the same backbone"
        )
    check_checkpoint_classes(checkpoint, config.init_from, class_names, key="init_from")


def adapt_batch_norm(model: ImageClassifier, datamodule: TransferDataModule) -> None:
    """freeze.bn=adapt: keep the pretrained batch-norm statistics only if the training images fit them;
    a backbone from pretrain.py always updates them."""
    method = (stored_hyperparameters(model.backbone_config.weights) or {}).get("method")
    if isinstance(method, dict):
        # its statistics fit the images it was pretrained on, but kept frozen while every layer trains, 7
        # of 18 fine-tunes on digits collapsed to chance; updated, none of 6 (experiments/unsupervised_pretraining)
        model.set_bn_mode("train")
        log.info(
            "freeze.bn=adapt: the backbone comes from pretrain.py (%s): statistics updated",
            method.get("name"),
        )
        return
    images = (batch for batch, _ in datamodule.split_dataloader("train"))
    # the loader draws a seed from torch's generator: fork it, so that training's random stream is unchanged
    with torch.random.fork_rng(devices=[]):
        shift = statistics_shift(model.backbone, itertools.islice(images, MEASURED_BATCHES))
    mode = adapted_bn_mode(shift)
    model.set_bn_mode(mode)
    if shift is None:
        log.info("freeze.bn=adapt: the backbone has no batch norm")
    else:
        kept = "kept (they fit)" if mode == "eval" else "updated (they do not fit)"
        log.info(
            "freeze.bn=adapt: the training images shift the pretrained batch-norm means by %.2f standard "
            "deviations (threshold %.2f): statistics %s, freeze.bn=%s",
            shift,
            SHIFT_THRESHOLD,
            kept,
            mode,
        )
