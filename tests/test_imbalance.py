"""Class imbalance: class weights, sampler weights and the focal loss are the right numbers; runs use them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import WeightedRandomSampler

from tests.conftest import data_config
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.datasets import build_splits
from transferlab.data.imbalance import balanced_sampler, class_weights
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.models.losses import ClassificationLoss, focal_loss
from transferlab.training import per_class_recall_table, train

TINY = Preprocessing(crop_size=16, resize_size=18)
DIGITS = {"name": "digits", "split_seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "num_workers": 0}


def test_class_weights_are_n_over_k_times_count():
    assert class_weights([8, 2]) == pytest.approx([10 / 16, 10 / 4])
    assert class_weights([5, 5, 5]) == pytest.approx([1.0, 1.0, 1.0])
    weights, counts = class_weights([30, 10, 60]), np.array([30, 10, 60])
    assert np.dot(weights, counts) / counts.sum() == pytest.approx(1.0)  # mean weight per image is 1


def test_sampler_draws_each_image_with_weight_one_over_its_class_count():
    labels = np.array([0] * 8 + [1] * 2)
    sampler = balanced_sampler(labels, num_classes=2)
    assert sampler.weights.tolist() == pytest.approx([1 / 8] * 8 + [1 / 2] * 2)
    assert sampler.num_samples == 10 and sampler.replacement
    torch.manual_seed(0)
    drawn = labels[np.fromiter((i for _ in range(500) for i in sampler), dtype=int)]
    assert abs(drawn.mean() - 0.5) < 0.03  # the 20% class is drawn half the time


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    weight, soft = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.softmax(torch.randn(6, 4), dim=1)
    for kwargs in (
        {},
        {"weight": weight},
        {"label_smoothing": 0.1},
        {"weight": weight, "label_smoothing": 0.1},
    ):
        for target in (targets, soft):
            assert focal_loss(logits, target, gamma=0.0, **kwargs) == pytest.approx(
                F.cross_entropy(logits, target, **kwargs).item(), rel=1e-5
            )


def test_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    p = math.exp(2) / (math.exp(2) + 1)
    easy, hard = -((1 - p) ** 2) * math.log(p), -(0.5**2) * math.log(0.5)
    assert focal_loss(logits, torch.tensor([0, 1]), gamma=2.0).item() == pytest.approx((easy + hard) / 2)
    weighted = focal_loss(logits, torch.tensor([0, 1]), gamma=2.0, weight=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((easy + 3 * hard) / 4)  # normalised by the targets' weights
    soft = focal_loss(logits[:1], torch.tensor([[0.25, 0.75]]), gamma=2.0)
    assert soft.item() == pytest.approx(0.25 * easy - 0.75 * p**2 * math.log(1 - p))


def test_loss_module_keeps_class_weights_out_of_the_state_dict():
    loss = ClassificationLoss("cross_entropy", class_weights=[1.0, 4.0], label_smoothing=0.0, focal_gamma=2.0)
    assert "weight" not in loss.state_dict() and loss.weight.tolist() == [1.0, 4.0]
    logits, targets = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 0])
    assert loss(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits, targets, weight=torch.tensor([1.0, 4.0])).item()
    )
    with pytest.raises(ConfigError, match="loss.name='hinge'"):
        ClassificationLoss("hinge", class_weights=None, label_smoothing=0.0, focal_gamma=2.0)


def test_class_fraction_cuts_only_the_named_training_classes():
    full = build_splits(data_config(DIGITS))
    cut = build_splits(data_config({**DIGITS, "class_fraction": {3: 0.1, "8": 0.1}}))
    before, after = np.bincount(full.train.labels()), np.bincount(cut.train.labels())
    for digit in range(10):
        expected = round(before[digit] * 0.1) if digit in (3, 8) else before[digit]
        assert after[digit] == expected, digit
    assert cut.val.indices == full.val.indices and cut.test.indices == full.test.indices
    assert build_splits(data_config({**DIGITS, "class_fraction": {3: 0.1}}), seed=7).train.indices == (
        build_splits(data_config({**DIGITS, "class_fraction": {3: 0.1}}), seed=8).train.indices
    )  # fixed by split_seed, not the run seed
    with pytest.raises(ConfigError, match="data.class_fraction: 'x' is neither"):
        build_splits(data_config({**DIGITS, "class_fraction": {"x": 0.1}}))
    with pytest.raises(
        ConfigError, match=r"data.class_fraction=\{3: 1.5\} must map classes to fractions in \(0, 1\]"
    ):
        build_splits(data_config({**DIGITS, "class_fraction": {3: 1.5}}))


def test_datamodule_weights_and_sampler_follow_the_training_counts():
    data = {**DIGITS, "class_fraction": {0: 0.2}, "imbalance": "sampler", "batch_size": 16}
    dm = TransferDataModule(data_config(data), TINY)
    counts = np.array(list(dm.class_counts()["train"].values()))
    assert dm.class_weights() == pytest.approx((counts.sum() / (10 * counts)).tolist())
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, WeightedRandomSampler)
    labels = dm.splits.train.labels()
    assert sampler.weights.tolist() == pytest.approx((1.0 / counts[labels]).tolist())
    plain = TransferDataModule(data_config({**data, "imbalance": "none"}), TINY)
    assert not isinstance(plain.train_dataloader().sampler, WeightedRandomSampler)


@pytest.mark.parametrize("imbalance", ["class_weights", "sampler", "focal"])
def test_runs_with_each_imbalance_option(imbalance, fast_cfg, tmp_path, caplog):
    with caplog.at_level("INFO", logger="transferlab.training"):
        metrics = train(fast_cfg(f"data.imbalance={imbalance}", "data.class_fraction={3:0.1}"))
    assert 0 <= metrics["test/f1"] <= 1 and 0 <= metrics["test/acc_class/3"] <= 1
    recall_row = (
        f"  3      {metrics['test/acc_class/3']:6.3f}      11{metrics['class_counts']['test']['3']:8d}"
    )
    assert "Per-class test recall" in caplog.text and recall_row in caplog.text.splitlines()
    assert metrics["class_counts"]["train"]["3"] == round(108 * 0.1)
    hparams = torch.load(metrics["best_ckpt"], weights_only=True)["hyper_parameters"]["loss"]
    assert hparams["name"] == ("focal" if imbalance == "focal" else "cross_entropy")
    if imbalance == "class_weights":
        counts = np.array(list(metrics["class_counts"]["train"].values()))
        assert hparams["class_weights"] == pytest.approx((counts.sum() / (10 * counts)).tolist())
        logged = {}  # the counts per class reach the loggers
        for events in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events)).Reload()
            for tag in accumulator.Tags()["scalars"]:
                if tag.startswith("data/"):
                    logged[tag] = accumulator.Scalars(tag)[0].value
        assert logged["data/train_count/3"] == counts[3] and logged["data/test_count/3"] > counts[3]
    else:
        assert hparams["class_weights"] is None


def test_per_class_recall_table_puts_each_recall_next_to_the_counts():
    metrics = {"test/acc_class/cat": 0.5, "test/acc_class/hedgehog": 1.0, "test/acc": 0.75}
    counts = {"train": {"cat": 2, "hedgehog": 80}, "test": {"cat": 4, "hedgehog": 4}}
    assert per_class_recall_table(metrics, counts).splitlines() == [
        "Per-class test recall:",
        "  class     recall   train    test",
        "  cat        0.500       2       4",
        "  hedgehog   1.000      80       4",
    ]
