"""`tune.lr_find=true`: Lightning's learning-rate finder, run before training; its suggestion becomes
`optim.lr` (the head's LR; backbone stages keep their multipliers relative to it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.tuner import Tuner

from transferlab.config.schema import TuneConfig
from transferlab.errors import ConfigError
from transferlab.files import write_json

log = logging.getLogger(__name__)


def find_lr(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    cfg: TuneConfig,
    output_dir: Path,
    loggers: list[Logger],
) -> float:
    """Run the range test, save its plot and numbers in the run directory and TensorBoard, and set
    the model's `optim.lr` to the suggestion. Fails, rather than guessing, when there is none."""
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=datamodule,
        min_lr=cfg.min_lr,
        max_lr=cfg.max_lr,
        num_training=cfg.num_training,
        mode=cfg.mode,
        update_attr=False,
    )
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise ConfigError(
            "tune.lr_find: the LR finder found no point of steepest descent (too few steps or a loss that "
            "never decreased). Raise tune.num_training or widen tune.min_lr/max_lr, or set optim.lr yourself."
        )
    previous = model.optim_config.lr
    model.set_lr(float(suggestion))
    log.info("LR finder suggests %.3g; optim.lr %.3g -> %.3g", suggestion, previous, suggestion)
    if trainer.is_global_zero:
        _save(finder, float(suggestion), output_dir, loggers)
    return float(suggestion)


def _save(finder: Any, suggestion: float, output_dir: Path, loggers: list[Logger]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        output_dir / "lr_find.json",
        {"suggestion": suggestion, "lr": list(finder.results["lr"]), "loss": list(finder.results["loss"])},
    )
    figure = finder.plot(suggest=True)
    figure.savefig(output_dir / "lr_find.png", dpi=100)
    for logger in loggers:
        logger.log_metrics({"tune/lr_suggestion": suggestion}, step=0)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("tune/lr_find", figure, global_step=0)
    plt.close(figure)
