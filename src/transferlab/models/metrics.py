"""torchmetrics collections for each stage: accuracy (top-1, top-5), macro precision/recall/F1."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

TOP5_MIN_CLASSES = 5  # top-5 accuracy is logged with more classes than this (with fewer it is always 1)


def classification_metrics(num_classes: int) -> MetricCollection:
    """Per-epoch metrics logged as `<stage>/acc`, `acc_top5` (>5 classes), `precision`, `recall`, `f1`:
    the names of `config.schema.METRIC_DIRECTIONS`, beside `<stage>/loss`."""
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    # Compute groups (metrics sharing one state) named, not guessed: torchmetrics' automatic grouping
    # compares the states after the first batch, and merged acc with precision/recall/F1 or with
    # acc_top5 when that batch happened to give them equal states (e.g. one class, all right), so that
    # test/f1 came out as 1.0000001 at test/acc 0.978.
    groups = [["acc"], ["precision", "recall", "f1"]]
    if num_classes > TOP5_MIN_CLASSES:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        groups.append(["acc_top5"])
    return MetricCollection(metrics, compute_groups=groups)


def per_class_metrics(num_classes: int) -> MetricCollection:
    """Test-time detail: accuracy of each class (its recall) and the confusion matrix."""
    return MetricCollection(
        {
            "acc_class": MulticlassAccuracy(num_classes, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }
    )
