"""Self-supervised pretraining of a backbone on unlabelled images (pretrain.py): a convolutional
autoencoder, or SimCLR through lightly. The backbone is `self.backbone`, as in `ImageClassifier`, so the
checkpoint loads with `backbone.weights=<pretrain checkpoint>` like any other of ours (the decoder or the
projection head is skipped).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.backbones import Backbone, build_backbone, load_pretrained
from transferlab.backbones.feature_maps import probe_tokens
from transferlab.config import parse_group
from transferlab.config.parse import parse_pretrain_method
from transferlab.config.schema import AutoencoderConfig, SimCLRConfig
from transferlab.errors import ConfigError
from transferlab.finetune.optim import StageParams, build_optimizer, optimizers_for


class ConvDecoder(nn.Sequential):
    """From a feature map (B, C, h, w) back to an image (B, 3, size, size): blocks of 2x nearest
    upsampling + 3x3 conv + batch norm + ReLU, halving the channels (down to `min_channels`), until the map
    is at least `size`; a 3x3 conv to 3 channels; then resized to exactly `size` when the backbone's
    stride is not a power of two. Upsampling then convolving avoids transposed convolutions' checkerboard."""

    def __init__(self, channels: int, map_size: int, size: int, min_channels: int = 32) -> None:
        layers: list[nn.Module] = []
        for _ in range(max(0, math.ceil(math.log2(size / map_size)))):
            out = max(min_channels, channels // 2)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        super().__init__(*layers)
        self.size = size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        images = super().forward(features)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return images


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, h*w, C) tokens of a square input back to the (B, C, h, w) map."""
    batch, positions, channels = tokens.shape
    side = math.isqrt(positions)
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


def corrupt(images: torch.Tensor, method: AutoencoderConfig) -> torch.Tensor:
    """The autoencoder's input: the images as they are, with Gaussian noise (denoising), or with random
    square patches set to 0, the normalised mean (masked)."""
    if method.corruption == "noise":
        return images + method.noise_std * torch.randn_like(images)
    if method.corruption == "mask":
        batch, _, height, width = images.shape
        grid = (math.ceil(height / method.mask_patch), math.ceil(width / method.mask_patch))
        keep = (torch.rand(batch, 1, *grid, device=images.device) >= method.mask_ratio).to(images.dtype)
        keep = F.interpolate(keep, scale_factor=method.mask_patch, mode="nearest")[..., :height, :width]
        return images * keep
    return images


class Pretrainer(L.LightningModule):
    """A backbone (its unpooled feature map) trained without labels by `method`: autoencoder (with a
    `ConvDecoder`) or simclr (lightly's projection head and NT-Xent loss). Plain-data arguments, stored in
    the checkpoint, as `ImageClassifier`'s."""

    def __init__(
        self,
        backbone: dict[str, Any],
        method: dict[str, Any],
        optim: dict[str, Any],
        scheduler: dict[str, Any],
        preprocessing: dict[str, Any],
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.backbone_config = parse_group("backbone", backbone)
        self.method = parse_pretrain_method(method)
        self.optim_config = parse_group("optim", optim)
        self.optim_config.resolve_backbone_lr_mult(pretrained=False)  # one rate for the whole network
        self.scheduler_config = parse_group("scheduler", scheduler)
        config = self.backbone_config
        built = build_backbone(config.source, config.name, feature_map=True)
        self.backbone, self.feature_map = built.module, built.feature_map
        self.num_features, self._classifier_prefix = built.num_features, built.classifier_prefix
        self.crop_size = int(preprocessing["crop_size"])
        self.mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
        if isinstance(self.method, AutoencoderConfig):
            map_size = self._map_size()
            self.decoder = ConvDecoder(
                built.num_features, map_size, self.crop_size, self.method.decoder_min_channels
            )
        else:
            from lightly.loss import NTXentLoss
            from lightly.models.modules import SimCLRProjectionHead

            self.projection = SimCLRProjectionHead(
                built.num_features, self.method.hidden_dim, self.method.projection_dim
            )
            # negatives from every process's batch under DDP
            self.criterion = NTXentLoss(temperature=self.method.temperature, gather_distributed=True)

    def _map_size(self) -> int:
        """The side of the backbone's map for this crop size, from one blank image."""
        try:
            tokens = probe_tokens(self.backbone, self.feature_map, self.crop_size)
        except (RuntimeError, ValueError, AssertionError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(
                f"data.image_size={self.crop_size} does not fit backbone {self.backbone_config.name} ({reason})"
            ) from None
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ConfigError(
                f"method=autoencoder: backbone {self.backbone_config.name} gives {tokens.shape[1]} positions "
                "for a square image, not a square map to decode: choose a CNN backbone"
            )
        return side

    def load_pretrained_backbone(self) -> None:
        """Start from `backbone.weights` (null: random, the usual start of pretraining)."""
        config = self.backbone_config
        backbone = Backbone(self.backbone, self.num_features, self._classifier_prefix, self.feature_map)
        load_pretrained(backbone, config.source, config.name, config.weights, trust_file=config.trust_file)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(self.backbone, images)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's output for (corrupted) normalised images."""
        return self.decoder(tokens_to_map(self.tokens(images)))

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images back to [0, 1] (for pictures)."""
        return (images * self.std.to(images) + self.mean.to(images)).clamp(0, 1)

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.method, SimCLRConfig):  # (B, 2, 3, H, W): two views of each image
            first, second = images[:, 0], images[:, 1]
            both = self.projection(self.tokens(torch.cat([first, second])).mean(dim=1))
            return self.criterion(*both.chunk(2))
        return F.mse_loss(self.reconstruct(corrupt(images, self.method)), images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch[0])
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(batch[0]),
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch[0])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        stage = StageParams("backbone", list(self.backbone.named_parameters()), 0)
        others = self.decoder if isinstance(self.method, AutoencoderConfig) else self.projection
        optimizer = build_optimizer(self.optim_config, [stage], others)
        return optimizers_for(self.trainer, self.scheduler_config, optimizer)
