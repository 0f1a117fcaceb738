"""Confidence calibration: temperature scaling (Guo et al., 2017) and the expected calibration error.

A temperature T divides the logits before the softmax: accuracy is unchanged, the probabilities become
honest when T is fitted on held-out data (the val split) by minimising the negative log-likelihood.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

MAX_ITERATIONS = 200


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the NLL of `logits / T` on (logits, targets), by LBFGS on log T
    (so that T stays positive)."""
    # clones: tensors made under torch.inference_mode cannot take part in autograd
    logits, targets = logits.detach().double().clone(), targets.detach().long().clone()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@dataclass(frozen=True)
class ReliabilityBins:
    """Confidence bins: the edges, and per bin its images, mean confidence and accuracy (NaN when empty)."""

    edges: list[float]
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]


def reliability_bins(probabilities: torch.Tensor, targets: torch.Tensor, bins: int) -> ReliabilityBins:
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bin i holds confidences in (edges[i], edges[i+1]]; confidence 0 cannot happen with a softmax
    index = torch.clamp(torch.bucketize(confidence.double(), edges, right=False) - 1, 0, bins - 1)
    counts, mean_conf, accuracy = [], [], []
    for i in range(bins):
        chosen = index == i
        n = int(chosen.sum())
        counts.append(n)
        mean_conf.append(float(confidence[chosen].double().mean()) if n else float("nan"))
        accuracy.append(float(correct[chosen].mean()) if n else float("nan"))
    return ReliabilityBins(edges.tolist(), counts, mean_conf, accuracy)


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share of the images."""
    table = reliability_bins(probabilities, targets, bins)
    total = sum(table.counts)
    return sum(
        n / total * abs(acc - conf)
        for n, acc, conf in zip(table.counts, table.accuracy, table.confidence, strict=True)
        if n
    )


@dataclass(frozen=True)
class Calibration:
    """What `calibrate=true` stores in the checkpoint (checkpoint["calibration"]) and metrics.json."""

    temperature: float
    split: str  # the split it was fitted on
    images: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    bins: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(logits: torch.Tensor, targets: torch.Tensor, split: str = "val", bins: int = 15) -> Calibration:
    """Fit the temperature on these logits and report the NLL and ECE before and after."""
    logits, targets = logits.detach().double(), targets.detach().long()
    temperature = fit_temperature(logits, targets)

    def scores(t: float) -> tuple[float, float]:
        nll = float(F.cross_entropy(logits / t, targets))
        return nll, expected_calibration_error(torch.softmax(logits / t, dim=1), targets, bins)

    (nll_before, ece_before), (nll_after, ece_after) = scores(1.0), scores(temperature)
    return Calibration(temperature, split, len(targets), nll_before, nll_after, ece_before, ece_after, bins)


def stored_temperature(checkpoint: dict[str, Any]) -> float:
    """The checkpoint's fitted temperature; 1 (the logits as trained) when it was not calibrated."""
    return float((checkpoint.get("calibration") or {}).get("temperature", 1.0))
