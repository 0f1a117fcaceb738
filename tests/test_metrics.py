"""Metrics match values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from transferlab.models.metrics import classification_metrics, per_class_metrics

# 3 classes. predictions [0,0,1,2,2,2] vs targets [0,1,1,2,2,0]
PREDS = torch.tensor([0, 0, 1, 2, 2, 2])
TARGETS = torch.tensor([0, 1, 1, 2, 2, 0])


def logits_for(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(preds, num_classes).float() * 5.0


def test_macro_metrics_by_hand():
    metrics = classification_metrics(3)
    metrics.update(logits_for(PREDS, 3), TARGETS)
    values = {k: v.item() for k, v in metrics.compute().items()}
    assert values["acc"] == pytest.approx(4 / 6)
    # precision per class: 1/2, 1/1, 2/3 ; recall per class: 1/2, 1/2, 2/2
    assert values["precision"] == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert values["recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    f1 = [0.5, 2 * 1.0 * 0.5 / 1.5, 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)]
    assert values["f1"] == pytest.approx(sum(f1) / 3)
    assert "acc_top5" not in values  # only with more than 5 classes


def test_per_class_accuracy_and_confusion_matrix_by_hand():
    detail = per_class_metrics(3)
    detail.update(logits_for(PREDS, 3), TARGETS)
    values = detail.compute()
    assert values["acc_class"].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert values["confusion_matrix"].tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]  # rows: true class


def test_top5_accuracy_with_more_than_five_classes():
    metrics = classification_metrics(7)
    logits = torch.arange(7, dtype=torch.float).repeat(2, 1)  # ranking: 6,5,4,3,2,1,0
    values = metrics(logits, torch.tensor([2, 1]))  # 2 is in the top 5, 1 is not
    assert values["acc_top5"].item() == pytest.approx(0.5)
    assert values["acc"].item() == 0.0


def test_binary_problem_uses_two_class_metrics():
    metrics = classification_metrics(2)
    values = metrics(logits_for(torch.tensor([0, 1, 1, 1]), 2), torch.tensor([0, 1, 0, 1]))
    assert values["acc"].item() == pytest.approx(0.75)
    assert values["recall"].item() == pytest.approx((0.5 + 1.0) / 2)


def test_a_first_batch_of_one_class_all_right_does_not_merge_metrics():
    # torchmetrics' automatic compute groups compare states after the first update: equal states there
    # (one class, every prediction right) merged metrics that differ later
    metrics = classification_metrics(10)
    one_class = torch.full((4,), 3)
    metrics.update(torch.nn.functional.one_hot(one_class, 10).float(), one_class)
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    metrics.update(logits, targets)
    values = {k: float(v) for k, v in metrics.compute().items()}
    alone = classification_metrics(10)
    for name, metric in alone.items():  # each metric updated on its own: the reference
        metric.update(torch.nn.functional.one_hot(one_class, 10).float(), one_class)
        metric.update(logits, targets)
        assert values[name] == pytest.approx(float(metric.compute())), name
    assert values["f1"] <= 1 and values["acc_top5"] > values["acc"]
