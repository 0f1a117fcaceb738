"""`ema.*`: an EMA of the weights (finetune/averaging.py) is what validation measures, best.ckpt holds and
the run is tested with; its warm-up; resume continues it exactly; its keys are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import transferlab.training
from tests.conftest import FAST, compose_config, run_tool
from transferlab.config import parse_train_config
from transferlab.errors import ConfigError
from transferlab.finetune.averaging import EMAWeights, ema_decay, ema_multi_avg_fn

# epochs of 3 steps at a constant learning rate (a run cut after epoch 0 and resumed is the same run)
EMA_RUN = [
    *(o for o in FAST if not o.startswith(("trainer.max_epochs", "trainer.limit_val", "trainer.limit_test"))),
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "scheduler=none",
    "logger=none",
    "callbacks.progress.mode=none",
    "ema.enabled=true",
]


class Recording(EMAWeights):
    """EMAWeights that keeps, at each validation and test epoch start, the weights evaluated and the raw
    (training) weights, with the trainer's stage."""

    seen: list[dict] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._record(trainer, pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        super().on_test_epoch_start(trainer, pl_module)
        self._record(trainer, pl_module)

    def _record(self, trainer, pl_module) -> None:
        raw = self.average.state_dict() if self.average is not None else None  # swapped: the raw weights
        Recording.seen.append(
            {
                "stage": trainer.state.fn.value,
                "sanity": trainer.sanity_checking,
                "epoch": trainer.current_epoch,
                "validated": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "raw": None if raw is None else {k: v.clone() for k, v in raw.items()},
            }
        )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _final(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "test/")) or k == "epochs_trained"}


def _ckpt(run_dir: Path, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.ckpt", weights_only=False)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    Recording.seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transferlab.training, "EMAWeights", Recording)
        assert run_tool("train", *EMA_RUN, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}") == 0
    return run_dir, list(Recording.seen)


def test_validation_best_ckpt_and_the_final_test_use_the_average(ema_run):
    run_dir, seen = ema_run
    during_fit = [s for s in seen if s["stage"] == "fit" and not s["sanity"]]
    after_fit = [s for s in seen if s["stage"] in ("validate", "test")]
    assert [s["epoch"] for s in during_fit] == [0, 1]
    # the best checkpoint's val metrics are the ones measured when it was saved: no second validation
    assert [s["stage"] for s in after_fit] == ["test"]
    for s in during_fit:  # validation swapped the average in: not the weights being trained
        assert not _same(s["validated"], s["raw"])
    best = _ckpt(run_dir, "best")
    validated_then = during_fit[best["epoch"]]
    assert _same(best["state_dict"], validated_then["validated"])  # what eval/predict/export load
    assert _same(best["current_model_state"], validated_then["raw"])  # kept for resuming only
    assert best["averaging_state"]["n_averaged"] == 3 * (best["epoch"] + 1)  # one update per step
    # the final test of best.ckpt runs its state_dict, not the raw weights it also holds
    for s in after_fit:
        assert _same(s["validated"], best["state_dict"]), s["stage"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_ckpt"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert {k: metrics[k] for k in best["val_metrics"]} == best["val_metrics"] and "val/acc" in metrics


def test_warmup_makes_the_average_follow_the_weights_early():
    assert ema_decay(0.999, 1, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 90, warmup=True) == pytest.approx(0.91)
    assert ema_decay(0.9, 10_000, warmup=True) == 0.9  # capped at the configured decay
    assert ema_decay(0.999, 1, warmup=False) == 0.999

    def averaged(warmup: bool) -> AveragedModel:
        model = nn.BatchNorm1d(1)
        average = AveragedModel(model, use_buffers=True, multi_avg_fn=ema_multi_avg_fn(0.999, warmup))
        for value in range(4):  # the weights (and the step counter) move 0, 1, 2, 3
            nn.init.constant_(model.weight, float(value))
            model.num_batches_tracked.fill_(value)
            average.update_parameters(model)
        return average

    warm, cold = averaged(warmup=True), averaged(warmup=False)
    assert warm.module.weight.item() > 2.0  # near the last weights (3)
    assert cold.module.weight.item() < 0.01  # without warm-up: still the first weights (0)
    assert warm.module.num_batches_tracked.item() == 3  # counters are copied, not averaged


def test_resumed_run_reaches_the_uninterrupted_run_with_the_same_average(ema_run, tmp_path):
    run_dir, _ = ema_run
    cut = tmp_path / "cut"
    assert run_tool("train", *EMA_RUN, "trainer.max_epochs=1", f"hydra.run.dir={cut}") == 0
    assert run_tool("train", f"resume={cut}", "trainer.max_epochs=2") == 0
    assert _final(cut) == _final(run_dir)
    resumed, whole = _ckpt(cut, "last"), _ckpt(run_dir, "last")
    assert resumed["averaging_state"]["n_averaged"] == whole["averaging_state"]["n_averaged"] == 6
    assert _same(resumed["state_dict"], whole["state_dict"])
    assert _same(resumed["current_model_state"], whole["current_model_state"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ema.enabled=true", "ema.decay=1.0"], r"ema.decay=1.0 must be in \(0, 1\)"),
        (["ema.enabled=true", "ema.decay=0"], r"ema.decay=0.0 must be in \(0, 1\)"),
        (["ema.decay=0.99"], "ema.decay is read only with ema.enabled=true"),
        (["ema.warmup=false"], "ema.warmup is read only with ema.enabled=true"),
        (["ema.enabled=true", "+ema.every=2"], "every is not a key of"),
    ],
)
def test_ema_keys_are_checked(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_train_config(compose_config([*FAST, *overrides], tmp_path))


def test_ema_is_off_by_default_and_parses(tmp_path):
    assert parse_train_config(compose_config(FAST, tmp_path)).ema.enabled is False
    config = parse_train_config(compose_config([*FAST, "ema.enabled=true", "ema.decay=0.99"], tmp_path))
    assert (config.ema.enabled, config.ema.decay, config.ema.warmup) == (True, 0.99, True)


def test_a_frozen_backbone_is_averaged_to_itself_so_cached_features_stay_valid(tmp_path, caplog):
    from transferlab.training import train

    probe = [*EMA_RUN, "trainer.max_epochs=1", "freeze=linear_probe", "augment=none", "optim.lr=0.1"]
    probe += ["data.classes=[0,1]", "data.shots=6", "data.batch_size=4"]  # few images to cache, 3 steps
    with caplog.at_level("INFO", logger="transferlab"):
        train(compose_config(probe, tmp_path))
    assert "Backbone features are cached" in caplog.text
    best = _ckpt(tmp_path, "best")
    average, raw = best["state_dict"], best["current_model_state"]
    backbone = [k for k in average if k.startswith("backbone.")]
    assert backbone and all(torch.equal(average[k], raw[k]) for k in backbone)  # exactly, bit for bit
    assert not all(torch.equal(average[k], raw[k]) for k in average if k.startswith("head."))
