"""Temperature scaling: it finds a known temperature, lowers the NLL and the ECE of an over-confident
model, and train calibrate=true stores it in best.ckpt."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import FAST, compose_config, validate
from transferlab.errors import ConfigError
from transferlab.models.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def overconfident(n: int = 4000, classes: int = 5, scale: float = 3.0, seed: int = 0):
    """Logits whose softmax is calibrated by construction (labels drawn from it), then multiplied by
    `scale`: a model `scale` times too sure of itself."""
    generator = torch.Generator().manual_seed(seed)
    honest = torch.randn(n, classes, generator=generator) * 2
    targets = torch.multinomial(torch.softmax(honest, dim=1), 1, generator=generator).squeeze(1)
    return honest * scale, targets


def test_temperature_recovers_the_overconfidence_and_lowers_nll_and_ece():
    logits, targets = overconfident()
    assert fit_temperature(logits, targets) == pytest.approx(3.0, rel=0.1)
    result = calibrate(logits, targets, bins=15)
    assert result.nll_after < result.nll_before - 0.1
    assert result.ece_after < result.ece_before / 3
    assert result.nll_after == pytest.approx(float(F.cross_entropy(logits / result.temperature, targets)))


def test_an_underconfident_model_gets_a_temperature_below_one():
    logits, targets = overconfident(scale=0.5)
    assert fit_temperature(logits, targets) == pytest.approx(0.5, rel=0.1)


def test_ece_of_hand_made_bins():
    # two images at confidence 0.95 (one right), two at 0.65 (both right): |0.5-0.95|/2 + |1-0.65|/2 = 0.4
    probabilities = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    targets = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probabilities, targets, bins=10) == pytest.approx(0.4)
    table = reliability_bins(probabilities, targets, bins=10)
    assert table.counts[9] == 2 and table.counts[6] == 2 and sum(table.counts) == 4
    assert table.accuracy[9] == pytest.approx(0.5) and table.confidence[6] == pytest.approx(0.65)


def test_train_calibrate_stores_the_temperature_in_best_ckpt(trained_run):
    checkpoint = torch.load(trained_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    stored = checkpoint["calibration"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["calibration"] == pytest.approx(stored)
    assert stored["split"] == "val" and stored["images"] == 12  # the fixture's val split: 3 classes x 4
    assert stored["temperature"] > 0 and stored["nll_after"] <= stored["nll_before"] + 1e-9


def test_calibrate_needs_the_best_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="calibrate=true stores the temperature in best.ckpt"):
        validate(compose_config([*FAST, "calibrate=true", "~callbacks.model_checkpoint"], tmp_path))
