"""The LightningModule: a backbone, a new head, the loss, torchmetrics, and the optimizer setup.

What trains when (the freeze machinery) is `finetune.freeze.FrozenStages`, run by the
`FreezeCallback` this module hands every trainer that fits it; plots are callbacks too.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics import MeanMetric

from transferlab.backbones import Backbone, build_backbone, get_source, load_pretrained, run_backbone
from transferlab.config import parse_group
from transferlab.config.schema import OptimConfig
from transferlab.errors import ConfigError
from transferlab.finetune.freeze import FreezeCallback, FrozenStages, freeze_plan, resolve_bn_mode
from transferlab.finetune.optim import StageParams, build_optimizer, optimizers_for
from transferlab.models.distill import Teacher, distillation_loss
from transferlab.models.heads import pools_feature_map
from transferlab.models.losses import loss_from_hyperparameters
from transferlab.models.metrics import classification_metrics, per_class_metrics
from transferlab.models.pruned import apply_pruned_shapes, pruned_num_features


def set_bn_momentum(module: nn.Module, momentum: float | None) -> None:
    """`backbone.bn_momentum`: every batch norm's running-average momentum (None: as built)."""
    if momentum is None:
        return
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum


VAL_METRICS_KEY = "val_metrics"  # a checkpoint's own validation metrics (on_save_checkpoint)


class ImageClassifier(L.LightningModule):
    """Backbone + head. Every constructor argument is plain Python data, stored in checkpoints as is,
    so checkpoints load with `weights_only=True` and carry class names and preprocessing; the config
    groups among them are parsed with the schema (`config.parse_group`)."""

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
        pruned: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2 or len(class_names) != num_classes:
            raise ConfigError(
                f"num_classes={num_classes} must be >= 2 and match the {len(class_names)} class names"
            )
        self.save_hyperparameters(logger=False)
        self.backbone_config = parse_group("backbone", backbone)
        self.optim_config = self._optim_config()
        self.scheduler_config = parse_group("scheduler", scheduler)
        freeze_config = parse_group("freeze", freeze)
        head_kwargs = to_head_kwargs(head)
        # a pooling head (head=gap, attention) takes the backbone's unpooled feature map
        built = build_backbone(
            self.backbone_config.source,
            self.backbone_config.name,
            feature_map=pools_feature_map(head_kwargs["_target_"]),
        )
        self.backbone = built.module
        self.feature_map = built.feature_map
        set_bn_momentum(self.backbone, self.backbone_config.resolved_bn_momentum())
        self._classifier_prefix = built.classifier_prefix
        self.num_features = built.num_features
        self.head = instantiate(head_kwargs, in_features=built.num_features, num_classes=num_classes)
        if pruned:  # a channel-pruned checkpoint (compress.prune): its layer widths, before its weights load
            apply_pruned_shapes(self, pruned)
            self.num_features = pruned_num_features(self.head)
        self.criterion = loss_from_hyperparameters(loss)
        self.train_metrics = classification_metrics(num_classes)
        self.val_metrics = classification_metrics(num_classes)
        self.test_metrics = classification_metrics(num_classes)
        self.test_detail = per_class_metrics(num_classes)
        # val/test loss as a sample-weighted mean synced in float across DDP ranks; Lightning's own mean
        # of logged values rounds the averaged sample count to an integer when ranks see uneven splits
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.test_split = "test"  # eval.py sets the split name used as metric prefix
        self.test_confusion: torch.Tensor | None = None
        self.stages = get_source(self.backbone_config.source).stages(self.backbone)
        plan = freeze_plan(freeze_config, [stage.name for stage in self.stages])
        bn_mode = resolve_bn_mode(freeze_config.bn, pretrained=self.backbone_config.weights is not None)
        self.frozen_stages = FrozenStages(self.backbone, self.stages, plan, bn_mode)
        self.frozen_stages.apply(epoch=0, training=self.training)
        # model.cache_features: the batches of fit/validate/test hold the backbone's features, computed once
        # (finetune.feature_cache), and the head alone runs on them; forward() still takes images
        self.inputs_are_features = False
        # distill.*: a frozen teacher's logits as soft targets in training (build.load_teacher)
        self.teacher: Teacher | None = None
        self.distill_alpha, self.distill_temperature = 0.0, 1.0

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> ImageClassifier:
        """The network and weights of a checkpoint already read (`checkpoints.read_checkpoint`), as
        load_from_checkpoint makes them (a pruned one's widths included), without reading the file again."""
        model = cls(**checkpoint["hyper_parameters"])
        model.load_state_dict(checkpoint["state_dict"])
        return model

    def load_pretrained_backbone(self) -> None:
        """Fill the backbone from `backbone.weights` (a weights name, a local file, or null)."""
        config = self.backbone_config
        backbone = Backbone(self.backbone, self.num_features, self._classifier_prefix, self.feature_map)
        load_pretrained(backbone, config.source, config.name, config.weights, trust_file=config.trust_file)

    def set_lr(self, lr: float) -> None:
        """The head's learning rate (the LR finder's suggestion), also in the saved hyperparameters."""
        self.hparams.optim["lr"] = lr
        self.optim_config = self._optim_config()

    def set_teacher(self, teacher: Teacher, alpha: float, temperature: float) -> None:
        """Train against the labels and the teacher's softened logits (models/distill.py)."""
        self.teacher, self.distill_alpha, self.distill_temperature = teacher, alpha, temperature

    def set_bn_mode(self, mode: str) -> None:
        """Batch norm in the trainable stages (freeze.bn=adapt's measured choice), also in the saved
        hyperparameters, so that a resumed run keeps it without measuring the trained statistics."""
        self.hparams.freeze["bn"] = mode
        self.frozen_stages.bn_mode = mode
        self.frozen_stages.set_batchnorm_modes()

    def _optim_config(self) -> OptimConfig:
        """optim as saved, with backbone_lr_mult=auto resolved by whether the backbone starts pretrained."""
        config = parse_group("optim", self.hparams.optim)
        config.resolve_backbone_lr_mult(pretrained=self.backbone_config.weights is not None)
        return config

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the head takes: pooled features, or the unpooled tokens for a pooling head."""
        return run_backbone(self.backbone, self.feature_map, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def logits_of(self, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of every batch of `loader` (images, or features when inputs_are_features),
        in eval mode on this model's device; the model's mode is restored after."""
        was_training = self.training
        self.eval()
        outputs, targets = [], []
        try:
            for inputs, batch_targets in loader:
                inputs = inputs.to(self.device)
                outputs.append(
                    (self.head(inputs) if self.inputs_are_features else self(inputs)).float().cpu()
                )
                targets.append(batch_targets.cpu())
        finally:
            self.train(was_training)
        return torch.cat(outputs), torch.cat(targets)

    def configure_callbacks(self) -> list[Callback]:
        """Whatever trainer fits this model runs its freeze schedule (once: fit, validate and test
        of one trainer ask again)."""
        present = any(isinstance(c, FreezeCallback) for c in self.trainer.callbacks)
        return [] if present else [FreezeCallback()]

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:  # modules of frozen stages stay in eval mode
            self.frozen_stages.set_batchnorm_modes()
        return self

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics) -> torch.Tensor:
        inputs, targets = batch
        logits = self.head(inputs) if self.inputs_are_features else self(inputs)
        loss = self.criterion(logits, targets)
        if stage == "train" and self.teacher is not None:
            teacher_logits = self.teacher.logits(inputs)
            loss, soft = distillation_loss(
                logits, teacher_logits, loss, self.distill_alpha, self.distill_temperature
            )
            self.log("train/distill_loss", soft, on_epoch=True, batch_size=len(targets), sync_dist=True)
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
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._validated_at_step = self.trainer.global_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved right after a validation of these weights (best.ckpt, last.ckpt) keeps that
        # validation's metrics: the run reports the best checkpoint's from here, instead of validating it
        # a second time. Not one saved later (mid-epoch hpc_ckpt): its weights were not validated.
        if getattr(self, "_validated_at_step", None) == self.trainer.global_step:
            checkpoint[VAL_METRICS_KEY] = {
                name: float(value)
                for name, value in self.trainer.callback_metrics.items()
                if name.startswith("val/") and value.numel() == 1
            }

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_metrics, self.test_split)
        detail = self.test_detail.compute()
        self.test_detail.reset()
        for name, value in zip(self.class_names, detail["acc_class"], strict=True):
            self.log(f"{self.test_split}/acc_class/{name}", value)
        self.test_confusion = detail["confusion_matrix"].cpu()  # callbacks.ConfusionMatrixImage plots it

    def configure_optimizers(self) -> Any:
        params = dict(self.backbone.named_parameters())
        plan = self.frozen_stages.plan
        stages = [
            StageParams(stage.name, [(n, params[n]) for n in stage.param_names], plan.unfreeze_epoch(i))
            for i, stage in enumerate(self.stages)
        ]
        optimizer = build_optimizer(self.optim_config, stages, self.head)
        return optimizers_for(self.trainer, self.scheduler_config, optimizer)


def to_head_kwargs(head: dict[str, Any]) -> dict[str, Any]:
    """The head config as Hydra instantiates it: the schema's keys, checked."""
    return asdict(parse_group("head", head))
