"""The LightningModule: a backbone, a new head, the loss (`losses.py`), torchmetrics and the optimizer setup."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from transferlab.errors import ConfigError
from transferlab.finetune.freeze import freeze_plan, resolve_bn_mode, set_batchnorm_modes
from transferlab.finetune.optim import StageParams, build_optimizer, build_scheduler, stage_lr_scales
from transferlab.models.backbones import Backbone, build_backbone
from transferlab.models.losses import ClassificationLoss
from transferlab.models.metrics import classification_metrics, per_class_metrics
from transferlab.models.stages import backbone_stages
from transferlab.models.weights import load_pretrained

log = logging.getLogger(__name__)


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
        # val/test loss as a sample-weighted mean synced in float across DDP ranks; Lightning's own mean
        # of logged values rounds the averaged sample count to an integer when ranks see uneven splits
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.test_split = "test"  # eval.py sets the split name used as metric prefix
        self.test_confusion: torch.Tensor | None = None
        self.stages = backbone_stages(self.backbone, backbone["source"])
        self.freeze_plan = freeze_plan(freeze, [stage.name for stage in self.stages])
        self.bn_mode = resolve_bn_mode(
            freeze.get("bn", "auto"), pretrained=backbone.get("weights") is not None
        )
        self._mask_frozen_grads = False  # set under DDP, see setup()
        self._frozen_param_names: set[str] = set()
        self.apply_freeze(epoch=0)

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

    def apply_freeze(self, epoch: int) -> None:
        """Make exactly the stages the plan trains at `epoch` trainable; the rest get no gradient."""
        frozen: set[str] = set()
        params = dict(self.backbone.named_parameters())
        for index, stage in enumerate(self.stages):
            trains = self.freeze_plan.trains(index, epoch)
            if not trains:
                frozen.update(stage.param_names)
            # Under DDP, stages that train later keep requires_grad (DDP only syncs what required
            # grad when it wrapped the model) and lose their gradient in on_before_optimizer_step.
            keep = self._mask_frozen_grads and self.freeze_plan.ever_trains(index)
            for name in stage.param_names:
                params[name].requires_grad_(trains or keep)
        self._frozen_param_names = frozen
        if self.training:
            set_batchnorm_modes(self.backbone, self.bn_mode, frozen)

    def setup(self, stage: str) -> None:
        # Runs before the strategy wraps the model in DistributedDataParallel.
        if stage == "fit" and self.trainer.world_size > 1 and self.freeze_plan.strategy == "gradual":
            self._mask_frozen_grads = True
            self.apply_freeze(epoch=0)

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            self._log_stages()

    def _log_stages(self) -> None:
        scales = stage_lr_scales(
            len(self.stages),
            self.hparams.optim.get("backbone_lr_mult", 1.0),
            self.hparams.optim.get("layer_decay"),
        )
        lr = self.hparams.optim["lr"]
        lines = [
            f"  {i:>2} {stage.name:<40} lr {lr * scale:<10.3g} "
            + self._describe_unfreeze(self.freeze_plan.unfreeze_epoch(i))
            for i, (stage, scale) in enumerate(zip(self.stages, scales, strict=True))
        ]
        log.info(
            "Freeze strategy %s, batch norm %s; backbone stages (stem first):\n%s\n     head lr %.3g",
            self.freeze_plan.strategy,
            self.bn_mode,
            "\n".join(lines),
            lr,
        )

    @staticmethod
    def _describe_unfreeze(epoch: int | None) -> str:
        return "frozen" if epoch is None else "trains" if epoch == 0 else f"trains from epoch {epoch}"

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            set_batchnorm_modes(self.backbone, self.bn_mode, self._frozen_param_names)
        return self

    def on_train_epoch_start(self) -> None:
        # The epoch decides what is frozen (also right after a resume). Lightning restores per-module
        # modes after validation instead of calling train(), so batch-norm modes are re-applied here too.
        self.apply_freeze(self.current_epoch)
        set_batchnorm_modes(self.backbone, self.bn_mode, self._frozen_param_names)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._mask_frozen_grads and self._frozen_param_names:
            for name, param in self.backbone.named_parameters():
                if name in self._frozen_param_names:
                    param.grad = None  # no gradient: the optimizer skips it (no decay, no momentum)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        if targets.dim() == 1:  # mixup/cutmix batches have soft targets: no accuracy against them
            metrics.update(logits.detach(), targets)
        if stage == "test":
            self.test_detail.update(logits.detach(), targets)
        prefix = self.test_split if stage == "test" else stage
        if stage in self.eval_losses:
            self.eval_losses[stage].update(loss.detach(), weight=len(targets))
            self.log(f"{prefix}/loss", self.eval_losses[stage], on_epoch=True, prog_bar=True)
            return loss
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
        params = dict(self.backbone.named_parameters())
        stages = [
            StageParams(
                stage.name, [(n, params[n]) for n in stage.param_names], self.freeze_plan.unfreeze_epoch(i)
            )
            for i, stage in enumerate(self.stages)
        ]
        optimizer = build_optimizer(dict(self.hparams.optim), stages, self.head)
        total_steps = int(self.trainer.estimated_stepping_batches)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
        scheduler = build_scheduler(dict(self.hparams.scheduler), optimizer, total_steps, steps_per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
