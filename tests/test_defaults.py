"""The defaults' mechanics (experiments/imagenet_transfer): a tiny labelled set is drawn in several
reshuffled passes per epoch (data.min_batches_per_epoch), and the backbone trains at the head's LR with its
batch-norm statistics kept only when the training images fit them (optim.backbone_lr_mult=1,
freeze.bn=adapt); `auto`, the earlier default of both, keeps its meaning for the configs and checkpoints
that name it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.conftest import FAST, compose_config, data_config
from transferlab.build import build_model, preprocessing_for
from transferlab.config import parse_group, parse_train_config
from transferlab.config.schema import PRETRAINED_BACKBONE_LR_MULT
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.finetune.bn_fit import adapted_bn_mode, statistics_shift

TINY = Preprocessing(crop_size=8, resize_size=8)


def train_loader(shots: int | None, batch_size: int, min_batches: int, imbalance: str = "none"):
    values = {"name": "digits", "classes": [0, 1], "batch_size": batch_size, "imbalance": imbalance}
    data = data_config({**values, "shots": shots, "min_batches_per_epoch": min_batches})
    datamodule = TransferDataModule(data, TINY, seed=0)
    datamodule.setup()
    return datamodule.train_dataloader(), len(datamodule.splits.train.indices)


def test_a_tiny_labelled_set_is_drawn_in_whole_reshuffled_passes():
    loader, images = train_loader(shots=5, batch_size=4, min_batches=20)  # 10 images
    assert images == 10
    torch.manual_seed(0)
    drawn = list(loader.sampler)
    assert len(drawn) == 80 and len(loader) == 20  # 8 passes: the first whole number reaching 20 batches
    assert Counter(drawn) == dict.fromkeys(range(10), 8)  # every image equally often
    passes = [drawn[i : i + 10] for i in range(0, 80, 10)]
    assert all(sorted(p) == list(range(10)) for p in passes)  # each pass a permutation
    assert len({tuple(p) for p in passes}) > 1  # reshuffled, not repeated


def test_a_set_of_enough_batches_is_drawn_once_and_zero_turns_it_off():
    loader, images = train_loader(shots=None, batch_size=32, min_batches=2)
    assert len(list(loader.sampler)) == images  # already more than 2 batches
    loader, images = train_loader(shots=5, batch_size=4, min_batches=0)
    assert len(list(loader.sampler)) == images == 10


def test_the_balanced_sampler_draws_as_many_as_the_passes():
    loader, _ = train_loader(shots=5, batch_size=4, min_batches=20, imbalance="sampler")
    assert loader.sampler.num_samples == 80


@pytest.mark.parametrize("value", [-1, "fast", 1.5])
def test_min_batches_per_epoch_is_checked(value):
    with pytest.raises(ConfigError, match="data.min_batches_per_epoch"):
        data_config({"name": "digits", "min_batches_per_epoch": value})


def built_model(tmp_path, *overrides: str):
    """The model train.yaml's defaults plus `overrides` build (nothing is loaded to build it)."""
    config = parse_train_config(compose_config([*FAST, *overrides], tmp_path))
    return build_model(config, ["a", "b"], preprocessing_for(config.backbone, config.data), None)


def test_the_backbone_trains_at_the_heads_lr_and_batch_norm_adapts(tmp_path):
    for weights in ("DEFAULT", "null"):
        model = built_model(tmp_path, f"backbone.weights={weights}")
        assert model.optim_config.backbone_lr_mult == 1.0
        assert model.hparams.freeze["bn"] == "adapt"
    # from random weights there are no statistics to keep
    assert built_model(tmp_path, "backbone.weights=null").frozen_stages.bn_mode == "train"


def bn_net(shift: float) -> torch.nn.Module:
    """Conv + batch norm whose running statistics are those of standard normal images moved by `shift`."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4))
    net[0].weight.data = torch.eye(4, 3).view(4, 3, 1, 1)
    net[1].running_mean.fill_(shift)
    net[1].running_var.fill_(1.0)
    return net


def test_adapt_keeps_statistics_that_fit_and_updates_those_that_do_not():
    images = [torch.randn(32, 3, 8, 8) for _ in range(4)]  # per channel mean 0, std 1 (the 4th: 0)
    fits = statistics_shift(bn_net(0.0), images)
    assert fits < 0.1 and adapted_bn_mode(fits) == "eval"
    far = statistics_shift(bn_net(2.0), images)
    assert far == pytest.approx(2.0, abs=0.1) and adapted_bn_mode(far) == "train"
    assert adapted_bn_mode(statistics_shift(torch.nn.Linear(2, 2), images)) == "train"  # no batch norm
    net = bn_net(0.0).train()
    statistics_shift(net, images)
    assert net.training and torch.equal(net[1].running_mean, torch.zeros(4))  # measuring changes nothing


def test_auto_keeps_its_earlier_meaning(tmp_path):
    """auto: a tenth of the head's LR and the pretrained statistics from pretrained weights; 1 and
    updated statistics from random ones."""
    assert PRETRAINED_BACKBONE_LR_MULT == 0.1
    auto = ["optim.backbone_lr_mult=auto", "freeze.bn=auto"]
    pretrained = built_model(tmp_path, "backbone.weights=DEFAULT", *auto)
    assert (pretrained.optim_config.backbone_lr_mult, pretrained.frozen_stages.bn_mode) == (0.1, "eval")
    scratch = built_model(tmp_path, "backbone.weights=null", *auto)
    assert (scratch.optim_config.backbone_lr_mult, scratch.frozen_stages.bn_mode) == (1.0, "train")
    assert built_model(tmp_path, "optim.backbone_lr_mult=0.5").optim_config.backbone_lr_mult == 0.5


@pytest.mark.parametrize("value", ["fast", -0.1, True])
def test_backbone_lr_mult_is_auto_or_a_number(value):
    with pytest.raises(ConfigError, match=r"optim.backbone_lr_mult=.* must be 'auto' or a number >= 0"):
        parse_group("optim", {"_target_": "torch.optim.SGD", "lr": 0.1, "backbone_lr_mult": value})
