"""`model.cache_features`: a frozen backbone's features computed once per split, the head trained on them.

With a backbone that never trains (freeze=linear_probe, or partial with trainable_blocks=0: its weights
and, in frozen stages, its batch-norm statistics stay as they are) and training images that are not
random (augment=none: resized and center-cropped like evaluation images; no mixup/cutmix), every epoch
sends the same images through the same function. The features of each split are then computed once,
in memory, and the loaders yield (features, label) batches instead of (image, label) ones; the model
(`ImageClassifier.inputs_are_features`) runs its head alone on them.

The head sees what it would have seen: the loader over the features has the same length, sampler,
generator, batch size and drop_last as the loader over the images (and one worker if that one has any:
workers change when the shuffling seed is drawn), so its batches hold the same samples in the same
order and the global RNG (the sampler's draw, the head's dropout) is drawn the same way. The train
split's features are computed with the model in its training modes (frozen batch norm in eval mode),
the val/test splits' in eval mode, each under the trainer's precision context, on its device, through
Lightning's batch-transfer path. The backbone sees other batches than in the run on images (in order,
not shuffled), which on a CPU can change the last bits of a feature at most; the metrics of the
benchmark and the tests are identical.

Besides the config's part (`config.parse.cache_features_obstacle`: freeze, augment, mixup/cutmix),
two things are checked when the run is built (`use_feature_cache`):
- no layer of the backbone draws random numbers in training mode: dropout and stochastic depth stay
  active in a frozen backbone (the freeze machinery sets batch norm only), e.g. in torchvision's
  efficientnet_b0, convnext_tiny, vgg16 and mobilenet_v3_large, so their features differ every epoch;
- one process: under DDP `auto` is off and `true` refused. (Each process would compute every split's
  features and the distributed sampler would pick from them; simple, but not done nor tested.)

In memory only, not on disk: computing the features costs one pass over each split, which the run pays
once instead of every epoch. A disk cache would save that one pass more, for runs that repeat a backbone
on the same data (a sweep of head settings), but its key would have to cover the weights, the
preprocessing, the precision, the device and the images' contents (a file list does not see an image
edited in place); hashing the contents means reading every image, most of what the pass itself costs
with small backbones, and a stale entry would silently train on other data. Checkpoints are unchanged:
they hold the whole network (the backbone's weights included), so eval.py runs it on images.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from transferlab.config.parse import backbone_never_trains, cache_features_obstacle
from transferlab.config.schema import TrainConfig
from transferlab.errors import ConfigError

log = logging.getLogger(__name__)

# attributes of layers that drop at random in training mode (torch, torchvision, timm)
_DROP_ATTRIBUTES = ("drop_prob", "drop_rate", "drop_path_rate")


def stochastic_layers(module: nn.Module) -> list[str]:
    """The layers that draw random numbers in training mode: dropout, stochastic depth / drop path, and
    models that apply dropout in their own forward (timm's drop_rate)."""
    found = []
    for name, layer in module.named_modules():
        rates = [getattr(layer, key, None) for key in _DROP_ATTRIBUTES]
        kind = type(layer).__name__
        if isinstance(layer, nn.modules.dropout._DropoutNd) or "Drop" in kind or "Stochastic" in kind:
            rates.append(getattr(layer, "p", None))
        if any(isinstance(r, int | float) and not isinstance(r, bool) and r > 0 for r in rates):
            found.append(f"{name or '<backbone>'} ({kind})")
    return found


def use_feature_cache(config: TrainConfig, backbone: nn.Module, world_size: int) -> bool:
    """Whether this run trains its head on cached features (`model.cache_features`): `true` where it is not
    valid is a ConfigError saying why; `auto` with a frozen backbone says once why it is off."""
    setting = config.model.cache_features
    if setting is False:
        return False
    if not backbone_never_trains(config.freeze) and setting == "auto":
        return False  # nothing to say: the backbone trains
    reason = cache_features_obstacle(config)
    if reason is None and (layers := stochastic_layers(backbone)):
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        reason = (
            f"backbone {config.backbone.name} has layers that drop at random in training mode, even when "
            f"frozen ({shown}), so its features differ every epoch"
        )
    if reason is None and world_size > 1:
        reason = f"the run has {world_size} processes (DDP); features are cached in single-process runs only"
    if reason is not None:
        if setting is True:
            raise ConfigError(
                f"model.cache_features=true cannot be: {reason}. Use model.cache_features=auto (on exactly "
                "when it is valid) or false"
            )
        if rank_zero_only.rank == 0:
            log.info("Backbone features are not cached (model.cache_features=auto): %s", reason)
        return False
    log.info(
        "Backbone features are cached (model.cache_features=%s): the frozen backbone runs once per split, "
        "then only the head trains",
        "true" if setting is True else "auto",
    )
    return True


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of the module's parameters and buffers (values, names, dtypes, shapes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """The backbone features of each split, computed with `model` when a loader first asks for them and
    kept in memory. They are computed again only if the backbone's weights changed (a different key)."""

    def __init__(self, model: L.LightningModule) -> None:
        self.model = model
        self._stored: dict[tuple[str, bool], tuple[tuple[Any, ...], TensorDataset]] = {}
        self._hashed_versions: tuple[tuple[int, int], ...] = ()
        self._fingerprint = ""

    def dataset(
        self, name: str, images: Dataset, train: bool, batch_size: int, num_workers: int
    ) -> TensorDataset:
        """(features, label) of every image of `images`, in its order. `train`: computed with the model in
        its training modes (the train split), else in eval mode, as the step that would take them."""
        trainer = self.model._trainer
        key = (
            self._backbone_fingerprint(),
            str(trainer.precision) if trainer is not None else None,
            str(self.model.device),
        )
        stored = self._stored.get((name, train))
        if stored is not None and stored[0] == key:
            return stored[1]
        started = time.perf_counter()
        features = self._compute(images, train, batch_size, num_workers, trainer)
        log.info(
            "Cached the backbone features of the %s split: %d images in %.1f s",
            name,
            len(features),
            time.perf_counter() - started,
        )
        self._stored[(name, train)] = (key, features)
        return features

    def _backbone_fingerprint(self) -> str:
        """`weights_fingerprint` of the backbone, hashed again only after a tensor of it was written
        (loading a checkpoint or an optimizer step bumps its version counter)."""
        tensors = self.model.backbone.state_dict().values()
        versions = tuple((t.data_ptr(), t._version) for t in tensors)
        if versions != self._hashed_versions:
            self._fingerprint = weights_fingerprint(self.model.backbone)
            self._hashed_versions = versions
        return self._fingerprint

    def _compute(
        self, images: Dataset, train: bool, batch_size: int, num_workers: int, trainer: L.Trainer | None
    ) -> TensorDataset:
        model = self.model
        loader = DataLoader(
            images,
            batch_size=batch_size,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),  # no draw from the global RNG
        )
        modes = {module: module.training for module in model.modules()}
        model.train(train)  # ImageClassifier.train: batch norm of frozen stages stays in eval mode
        chunks: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        try:
            # the backbone draws nothing (use_feature_cache); fork_rng makes sure the run's RNG is untouched
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                for batch in loader:
                    labels.append(batch[1])
                    chunks.append(self._features(batch, train, trainer).cpu())
        finally:
            for module, training in modes.items():
                module.training = training
        return TensorDataset(torch.cat(chunks), torch.cat(labels))

    def _features(self, batch: Any, train: bool, trainer: L.Trainer | None) -> torch.Tensor:
        """The backbone's output for a batch, the way a training or validation step would compute it."""
        model = self.model
        if trainer is None:
            return model.features(batch[0].to(model.device))
        precision = trainer.precision_plugin
        batch = precision.convert_input(batch)
        batch = model._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        context = precision.train_step_context() if train else precision.val_step_context()
        with context:
            return model.features(batch[0])
