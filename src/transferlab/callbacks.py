"""Lightning callbacks of ours: the progress display (rich bar on a terminal, plain lines otherwise), the
confusion matrix of a test and an autoencoder's reconstructions as TensorBoard images."""

from __future__ import annotations

import logging
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from transferlab.errors import ConfigError
from transferlab.models.pretrain import corrupt

log = logging.getLogger(__name__)

PROGRESS_MODES = ("auto", "rich", "plain", "none")


class EpochSummary(Callback):
    """One log line per epoch with the main metrics, for batch jobs and log files."""

    KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1")
    first_epoch = 0  # the first epoch this process trains (set at on_train_start)

    def _summary(self, trainer: L.Trainer, epoch: int) -> None:
        values = trainer.callback_metrics
        shown = "  ".join(
            f"{k}={values[k].item():.4f}" for k in self.KEYS if isinstance(values.get(k), torch.Tensor)
        )
        log.info("epoch %d/%d  %s", epoch + 1, trainer.max_epochs, shown)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_epoch = trainer.current_epoch  # after a resume, earlier epochs were another process's

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the previous epoch's train metrics are logged after callbacks' on_train_epoch_end: report them here
        if trainer.current_epoch > self.first_epoch:
            self._summary(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summary(trainer, trainer.current_epoch - 1)


def progress_display(mode: str = "auto") -> Callback | None:
    """`auto`: a rich progress bar when stdout is a terminal, else one plain line per epoch."""
    if mode not in PROGRESS_MODES:
        raise ConfigError(
            f"callbacks.progress.mode={mode!r} is not valid; choose one of: {', '.join(PROGRESS_MODES)}"
        )
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    if mode == "rich":
        return RichProgressBar()
    return EpochSummary() if mode == "plain" else None


class ConfusionMatrixImage(Callback):
    """After a test, the model's confusion matrix (`test_confusion`) as an image in TensorBoard."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_test_epoch_end: callbacks run before the module's hook, which computes the matrix
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchmetrics.utilities.plot import plot_confusion_matrix

        names = pl_module.class_names
        fig, _ = plot_confusion_matrix(pl_module.test_confusion, add_text=len(names) <= 20, labels=names)
        for logger in tensorboards:
            logger.experiment.add_figure(
                f"{pl_module.test_split}/confusion_matrix", fig, global_step=trainer.global_step
            )
        plt.close(fig)


class ReconstructionImages(Callback):
    """pretrain method=autoencoder: after each validation, the first validation images, their corrupted
    input and the reconstruction, as one TensorBoard image (`pretrain/reconstructions`: rows of input,
    corrupted input, output)."""

    SHOWN = 8

    def __init__(self) -> None:
        self.images: torch.Tensor | None = None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self.images = batch[0][: self.SHOWN].detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if self.images is None or not tensorboards or not trainer.is_global_zero:
            return
        with torch.no_grad():
            corrupted = corrupt(self.images, pl_module.method)
            output = pl_module.reconstruct(corrupted)
        rows = [pl_module.denormalize(x.float()).cpu() for x in (self.images, corrupted, output)]
        grid = make_grid(torch.cat(rows), nrow=len(self.images), padding=1)
        for logger in tensorboards:
            logger.experiment.add_image("pretrain/reconstructions", grid, global_step=trainer.global_step)
        self.images = None
