"""The LightningModule: a backbone, a new head, the loss (`losses.py`), torchmetrics and the optimizer setup."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from transferlab.errors import ConfigError
from transferlab.finetune.freeze import apply_freeze, check_freeze, set_batchnorm_modes
from transferlab.finetune.optim import build_optimizer, build_scheduler
from transferlab.models.backbones import Backbone, build_backbone
from transferlab.models.losses import ClassificationLoss
from transferlab.models.metrics import classification_metrics, per_class_metrics
from transferlab.models.weights import load_pretrained


class ImageClassifier(L.LightningModule):
    """Backbone + head. Every constructor argument is plain Python data, stored in checkpoints as is,
    so checkpoints load with `weights_only=True` and carry class names and preprocessing."""

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        num_classes: int,
        class_names: list[str],
        optim: dict[str, Any],
        scheduler: dict[str, Any],
        freeze: dict[str, Any],
        preprocessing: dict[str, Any],
        loss: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2 or len(class_names) != num_classes:
            raise ConfigError(
                f"num_classes={num_classes} must be >= 2 and match the {len(class_names)} class names"
            )
        check_freeze(freeze.get("name", "none"), freeze.get("bn", "train"))
        self.save_hyperparameters(logger=False)
        built = build_backbone(backbone["source"], backbone["name"])
        self.backbone = built.module
        self._classifier_prefix = built.classifier_prefix
        self.num_features = built.num_features
        self.head = instantiate(head, in_features=built.num_features, num_classes=num_classes)
        self.criterion = ClassificationLoss.from_config(loss or {})
        self.train_metrics = classification_metrics(num_classes)
        self.val_metrics = classification_metrics(num_classes)
        self.test_metrics = classification_metrics(num_classes)
        self.test_detail = per_class_metrics(num_classes)
        self.test_split = "test"  # eval.py sets the split name used as metric prefix
        self.test_confusion: torch.Tensor | None = None
        apply_freeze(self.backbone, freeze.get("name", "none"))

    def load_pretrained_backbone(self, weights: str | None, trust_file: bool = False) -> None:
        """Fill the backbone from `backbone.weights` (a weights name, a local file, or None)."""
        hp = self.hparams.backbone
        backbone = Backbone(self.backbone, self.num_features, self._classifier_prefix)
        load_pretrained(backbone, hp["source"], hp["name"], weights, trust_file=trust_file)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            set_batchnorm_modes(self.backbone, self.hparams.freeze.get("bn", "train"))
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning restores per-module modes after validation instead of calling train(): re-apply the
        # batch-norm policy at every epoch start; the restore then keeps it for the rest of the epoch.
        set_batchnorm_modes(self.backbone, self.hparams.freeze.get("bn", "train"))

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        if targets.dim() == 1:  # mixup/cutmix batches have soft targets: no accuracy against them
            metrics.update(logits.detach(), targets)
        if stage == "test":
            self.test_detail.update(logits.detach(), targets)
        prefix = self.test_split if stage == "test" else stage
        self.log(
            f"{prefix}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=len(targets),
            sync_dist=True,
        )
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def _log_epoch_metrics(self, metrics, prefix: str) -> None:
        # compute() over the whole epoch (synced across processes): exact macro metrics, not batch means
        if all(metric.update_count == 0 for metric in metrics.values()):
            return  # an epoch of mixed batches only (mixup/cutmix): train metrics are not computed
        values = metrics.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=False)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics(self.train_metrics, "train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_metrics, self.test_split)
        detail = self.test_detail.compute()
        self.test_detail.reset()
        for name, value in zip(self.class_names, detail["acc_class"], strict=True):
            self.log(f"{self.test_split}/acc_class/{name}", value)
        self.test_confusion = detail["confusion_matrix"].cpu()
        self._log_confusion_image()

    def _log_confusion_image(self) -> None:
        tensorboards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards or self.trainer.sanity_checking:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchmetrics.utilities.plot import plot_confusion_matrix

        fig, _ = plot_confusion_matrix(
            self.test_confusion, add_text=self.hparams.num_classes <= 20, labels=self.class_names
        )
        for logger in tensorboards:
            logger.experiment.add_figure(
                f"{self.test_split}/confusion_matrix", fig, global_step=self.global_step
            )
        plt.close(fig)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(dict(self.hparams.optim), self.backbone, self.head)
        total_steps = int(self.trainer.estimated_stepping_batches)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
        scheduler = build_scheduler(dict(self.hparams.scheduler), optimizer, total_steps, steps_per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
