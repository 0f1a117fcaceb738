"""End to end: train -> checkpoint -> eval on digits through the real CLI, and the run-directory rules."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import FAST, ROOT, run_tool
from transferlab.errors import ConfigError, DataError
from transferlab.evaluation import evaluate
from transferlab.models.classifier import ImageClassifier
from transferlab.training import train

# the round trip evaluates whole val/test splits so that eval.py can be compared with training
ROUND_TRIP = [o for o in FAST if not o.startswith(("trainer.limit_val", "trainer.limit_test"))]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """`python train.py ...` in this process (the command in its own process: test_distributed, test_resume)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert run_tool("train", *ROUND_TRIP, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}") == 0
    return run_dir


def test_run_directory_holds_config_checkpoints_events_and_metrics(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in (
        "val/acc",
        "val/f1",
        "test/acc",
        "test/f1",
        "test/loss",
        "test/precision",
        "test/recall",
        "test/acc_top5",
    ):
        assert 0 <= metrics[key] <= (100 if key.endswith("loss") else 1), key
    assert len(metrics["test/confusion_matrix"]) == 10 and metrics["class_names"][0] == "0"
    assert sum(map(sum, metrics["test/confusion_matrix"])) == 360
    assert Path(metrics["best_ckpt"]) == (trained_run / "checkpoints" / "best.ckpt").resolve()


def test_tensorboard_has_scalars_learning_rates_hparams_and_confusion_image(trained_run):
    tags = {"scalars": set(), "images": set(), "tensors": set()}
    for events in (trained_run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "images": 0}).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags().get(kind, []))
    assert {"train/loss_step", "train/acc", "val/acc", "test/acc", "test/f1"} <= tags["scalars"]
    assert any(t.startswith("lr-SGD/head") for t in tags["scalars"])
    assert "test/confusion_matrix" in tags["images"]
    plugins = set()
    for events in (trained_run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events)).Reload()
        with contextlib.suppress(KeyError):  # files without hparams
            plugins |= set(acc.PluginTagToContent("hparams"))
    assert "_hparams_/session_start_info" in plugins


def test_checkpoint_is_plain_data_with_class_names_and_preprocessing(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["class_names"] == [str(i) for i in range(10)]
    assert hparams["preprocessing"]["crop_size"] == 16
    assert ckpt["datamodule_hyper_parameters"]["data"]["name"] == "digits"


def test_eval_reproduces_the_runs_metrics_and_they_are_right(trained_run, tmp_path):
    trained = json.loads((trained_run / "metrics.json").read_text())
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    for split in ("val", "test"):
        assert (
            run_tool("eval", f"ckpt_path={ckpt}", f"split={split}", f"hydra.run.dir={tmp_path / split}") == 0
        )
        evaluated = json.loads((tmp_path / split / "metrics.json").read_text())
        assert evaluated[f"{split}/acc"] == pytest.approx(trained[f"{split}/acc"], abs=1e-6)
        assert evaluated[f"{split}/f1"] == pytest.approx(trained[f"{split}/f1"], abs=1e-6)
    # accuracy counted by hand from the model's own predictions
    from tests.conftest import data_config
    from transferlab.data.datamodule import TransferDataModule
    from transferlab.data.transforms import Preprocessing

    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    stored = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]
    dm = TransferDataModule(data_config(stored["data"]), Preprocessing.from_dict(stored["preprocessing"]))
    correct = total = 0
    with torch.no_grad():
        for images, labels in dm.test_dataloader():
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    assert trained["test/acc"] == pytest.approx(correct / total, abs=1e-6)


def test_eval_takes_any_data_key_on_top_of_the_checkpoints(trained_run, tmp_path):
    """eval.py's data keys come from the data schemas: any key can be set, e.g. another image size."""
    from tests.conftest import compose_config

    ckpt = f"ckpt_path={trained_run}/checkpoints/best.ckpt"
    runs = {"typed": [ckpt, "data.image_size=24", "data.batch_size=7"], "preset": [ckpt, "data=digits"]}
    for name, overrides in runs.items():
        assert run_tool("eval", *overrides, f"hydra.run.dir={tmp_path / name}") == 0
    typed, preset = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs)
    assert typed["preprocessing"]["crop_size"] == 24 and 0 <= typed["test/acc"] <= 1
    assert preset["preprocessing"]["crop_size"] == 16  # the checkpoint's, not the preset's 32
    with pytest.raises(ConfigError, match="data.batchsize is not a key"):
        evaluate(compose_config([ckpt, "+data.batchsize=3"], tmp_path, "eval"))


def test_eval_refuses_data_with_other_classes(trained_run, tmp_path):
    from tests.conftest import compose_config

    cfg = compose_config(
        [f"ckpt_path={trained_run}/checkpoints/best.ckpt", "data.classes=[1,2,3]"], tmp_path, "eval"
    )
    with pytest.raises(DataError, match=r"trained on 10 classes .* but the data has 3 classes"):
        evaluate(cfg)


def test_never_overwrites_an_earlier_run(trained_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    assert run_tool("train", *FAST, f"hydra.run.dir={trained_run}") != 0
    message = capsys.readouterr().err
    assert "already holds a run" in message and f"or resume={trained_run} to continue it." in message
    assert (
        run_tool("eval", f"ckpt_path={trained_run}/checkpoints/best.ckpt", f"hydra.run.dir={trained_run}")
        != 0
    )
    message = capsys.readouterr().err
    assert "already holds a run" in message and "resume=" not in message  # eval has no resume=
    assert before == {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}


def test_a_bad_value_ends_the_run_with_one_line_not_a_traceback(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_tool("train", *FAST, "optim.layer_decay=2", f"hydra.run.dir={run_dir}") == 2
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "optim.layer_decay=2.0 must be in (0, 1]" in output and "Traceback" not in output
    assert "optim.layer_decay=2" in (run_dir / "train.log").read_text()  # the run's log has it too


def test_runs_started_together_get_different_directories():
    run_dir_template = (ROOT / "conf" / "hydra" / "default.yaml").read_text()
    assert "${now:%Y-%m-%d_%H-%M-%S}_${run_uid:}" in run_dir_template
    show = (  # importing the tool registers nothing: the tool registers before Hydra composes
        "import transferlab.tools.train; from transferlab.config import register_configs; "
        "from omegaconf import OmegaConf; assert not OmegaConf.has_resolver('run_uid'); "
        "register_configs(); print(OmegaConf.create({'d': '${run_uid:}'}).d)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", show], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    ids = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert len(ids[0]) == 6 and ids[0] != ids[1]  # same second, different processes: different run dirs


def test_same_command_twice_gives_the_same_metrics(fast_cfg, tmp_path):
    first = train(fast_cfg(output_dir=tmp_path / "a"))
    second = train(fast_cfg(output_dir=tmp_path / "b"))
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "test/f1"):
        assert first[key] == second[key], key


def test_binary_classification(fast_cfg, recwarn):
    metrics = train(fast_cfg("data.classes=[3,8]"))
    # nor does a run show the FutureWarning Lightning's own code triggers (build.build_trainer)
    assert not [w for w in recwarn if "treespec" in str(w.message)]
    assert metrics["class_names"] == ["3", "8"] and len(metrics["test/confusion_matrix"]) == 2
    assert "test/acc_top5" not in metrics and 0 <= metrics["test/acc"] <= 1


def test_failing_run_leaves_a_readable_directory(fast_cfg, tmp_path, monkeypatch):
    def explode(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("boom at step 1")
        return ImageClassifier._shared_step(self, batch, "train", self.train_metrics)

    monkeypatch.setattr(ImageClassifier, "training_step", explode)
    run_dir = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"):
        train(fast_cfg(output_dir=run_dir))
    assert "boom at step 1" in (run_dir / "error.txt").read_text()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and "train/loss_step" in EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert not (run_dir / "metrics.json").exists()


def test_frozen_backbone_does_not_change(fast_cfg, tmp_path):
    from torchvision.models import get_model

    weights = tmp_path / "r18.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), weights)
    run_dir = tmp_path / "frozen"
    train(fast_cfg("freeze=linear_probe", f"backbone.weights={weights}", output_dir=run_dir))
    source = torch.load(weights, weights_only=True)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in state.items():
        if key.startswith("backbone."):
            assert torch.equal(value, source[key.removeprefix("backbone.")]), key  # BN running stats too
    assert not any(k.startswith("backbone") for k in _optimizer_group_names(run_dir))


def _optimizer_group_names(run_dir: Path) -> list[str]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return [g["name"] for g in state["optimizer_states"][0]["param_groups"]]


def test_checkpoint_with_other_classes_is_refused(fast_cfg, trained_run, tmp_path):
    cfg = fast_cfg(
        f"ckpt_path={trained_run}/checkpoints/last.ckpt",
        "data.classes=[0,1]",
        "trainer.max_epochs=3",  # epochs left to train after the checkpoint's 2
        output_dir=tmp_path / "resume",
    )
    with pytest.raises(DataError, match="trained on 10 classes"):
        train(cfg)


def test_csv_logger_records_metrics_and_hyperparameters(fast_cfg, tmp_path):
    run_dir = tmp_path / "csv_run"
    metrics = train(fast_cfg("logger=csv", output_dir=run_dir))
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/acc" in rows[0].split(",") and len(rows) > 1
    assert "optim/lr" in (run_dir / "csv" / "hparams.yaml").read_text()
    assert (run_dir / "metrics.json").is_file() and 0 <= metrics["test/acc"] <= 1


def test_checkpoints_of_earlier_releases_still_load():
    """hyper_parameters as earlier releases stored them: the first release's freeze names, no layer decay
    keys, a loss of label smoothing only (before the imbalance options)."""
    model = ImageClassifier(
        backbone={"source": "torchvision", "name": "resnet18", "weights": None, "trust_file": False},
        head={"_target_": "transferlab.models.heads.LinearHead", "dropout": 0.0},
        num_classes=3,
        class_names=["a", "b", "c"],
        optim={
            "_target_": "torch.optim.SGD",
            "lr": 0.01,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
        },
        scheduler={"name": "cosine", "warmup_epochs": 1, "warmup_start_ratio": 0.01, "min_lr_ratio": 0.01},
        freeze={"name": "backbone"},
        preprocessing={
            "crop_size": 16,
            "resize_size": 18,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
        },
        loss={"label_smoothing": 0.1},
    )
    assert model.frozen_stages.plan.strategy == "linear_probe" and model.criterion.name == "cross_entropy"
    assert model.criterion.label_smoothing == 0.1 and model.optim_config.layer_decay is None


def test_loggers_are_closed_with_the_runs_status():
    from transferlab.training import finalizing

    class Recorder:
        def __init__(self) -> None:
            self.statuses: list[str] = []

        def finalize(self, status: str) -> None:
            self.statuses.append(status)

    def run(fail: bool) -> int:
        with finalizing(loggers):
            if fail:
                raise RuntimeError("boom")
            return 1

    loggers = [Recorder(), Recorder()]
    assert run(fail=False) == 1
    with pytest.raises(RuntimeError, match="boom"):
        run(fail=True)
    assert [logger.statuses for logger in loggers] == [["success", "failed"]] * 2
