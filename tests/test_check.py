"""`transferlab check`: the report and the exit status say whether training would start."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import compose_config, run_tool, write_hostile_folder, write_image_folder
from transferlab.build import LIGHTNING_INFO, build_trainer
from transferlab.config import parse_train_config


def main(overrides: list[str]) -> int:
    """The check with random-init weights: pretrained ones are not cached offline (a test below)."""
    return run_tool("check", "backbone.weights=null", "data.image_size=16", *overrides)


def test_hostile_folder_lists_counts_sizes_modes_and_every_bad_file(tmp_path, capsys):
    expected = write_hostile_folder(tmp_path)
    assert main(["data=imagefolder", f"data.root={tmp_path}"]) == 1
    out = capsys.readouterr().out
    for path in expected:
        assert f"  {path}: " in out
    assert "Bad files (5):" in out and "Training would stop" in out
    assert "Image sizes (width x height): min 12x12" in out and "Modes: RGB 21" in out
    assert "  a           7       2       2" in out  # per split and class: usable images found
    assert "train/a/notes.txt" in out  # ignored files are shown


def test_skip_bad_makes_it_pass_and_reports_the_splits(tmp_path, capsys):
    write_hostile_folder(tmp_path)
    assert main(["data=imagefolder", f"data.root={tmp_path}", "data.skip_bad=true"]) == 0
    out = capsys.readouterr().out
    assert "5 bad files would be skipped" in out and "OK: training would start" in out


def test_empty_class_and_missing_val_class_fail(tmp_path, capsys):
    write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1}})
    (tmp_path / "train" / "c").mkdir()
    assert main(["data=imagefolder", f"data.root={tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert "Classes without usable images in train: c" in out and "class folder(s) c" in out
    assert main(["data=imagefolder", f"data.root={tmp_path}", "data.empty_classes=drop"]) == 1
    assert "class(es) b have no images in the val split" in capsys.readouterr().out


def test_in_memory_data_and_bad_options(capsys):
    assert main(["data=digits"]) == 0
    out = capsys.readouterr().out
    assert "Splits as training would use them (10 classes)" in out and "OK" in out
    assert main(["data=imagefolder"]) == 1  # data.root missing
    assert "data.root" in capsys.readouterr().out
    assert main(["data=digits", "data.imbalance=oversample"]) == 1
    assert "data.imbalance='oversample' is not valid; choose one of" in capsys.readouterr().out
    assert main(["data=digits", "augment=randaugment", "augment.magnitude=40"]) == 1  # train.py would stop
    assert "augment.magnitude=40 must be in 0..30" in capsys.readouterr().out


def test_runs_from_anywhere_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Its configs come from the package, not from a checkout: run it from a folder that has no conf/."""
    write_hostile_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["data=imagefolder", f"data.root={tmp_path / 'data'}"]) == 1
    assert "train/b/cut.png" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run directory, no log


def test_what_train_refuses_before_its_data_check_refuses_too(tmp_path, capsys):
    """A sweep's settings without -m, and a callback's bad value (which train reports as a ConfigError,
    not as Hydra's InstantiationException)."""
    for overrides, message in [
        (["hparams_search=optuna"], "hparams_search=optuna: check -m checks the jobs a sweep lists"),
        (["hydra/launcher=slurm"], "hydra/launcher=slurm: check runs its checks here"),
        (["callbacks.progress.mode=fancy"], "callbacks.progress.mode='fancy' is not valid; choose one of"),
        (["data=from_checkpoint"], "data.name is not set: choose data=<one of: digits, cifar10"),
        (  # an argument the callback's class does not take, named with the class's own words
            ["callbacks=early_stopping", "+callbacks.early_stopping.patiance=3"],
            "early_stopping (lightning.pytorch.callbacks.EarlyStopping): EarlyStopping.__init__() got an "
            "unexpected keyword argument 'patiance'; check the spelling",
        ),
    ]:
        assert main(["data=digits", *overrides]) == 1  # the last data= wins
        assert message in capsys.readouterr().out
    status = run_tool(
        "train", "data=digits", "callbacks.progress.mode=fancy", f"hydra.run.dir={tmp_path / 'run'}"
    )
    printed = "".join(capsys.readouterr())
    assert status == 2 and "ConfigError: callbacks.progress.mode='fancy'" in printed
    assert "InstantiationException" not in printed


@pytest.fixture
def lightning_lines():
    """The lines Lightning logs (its info logger), as they reach its handler."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(LIGHTNING_INFO)
    logger.addHandler(handler)
    yield lambda: [record.getMessage() for record in records]
    logger.removeHandler(handler)


def test_a_run_logs_no_adverts_and_check_no_device_lines(tmp_path, lightning_lines):
    """The trainer with the default config: no Lightning "Tip" advert, no line per limit_*_batches
    setting; check does not list the devices a run would use (it reports the data)."""
    config = parse_train_config(compose_config([], tmp_path))
    build_trainer(config.trainer, callbacks=[], loggers=[])
    lines = lightning_lines()
    assert any(line.startswith("GPU available") for line in lines)  # the handler sees Lightning's lines
    assert not [line for line in lines if "Tip" in line or "limit_" in line]
    assert main(["data=digits"]) == 0
    assert lightning_lines() == lines  # nothing more


def test_a_sweep_is_checked_job_by_job_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """check -m: every job is checked (a job that would stop fails as a sweep job, and the sweep goes on
    to the next); the exit status is 1 if any would stop; Hydra's sweep folders go to a scratch folder."""
    monkeypatch.chdir(tmp_path)

    def sweep(lrs: str) -> int:
        return run_tool("check", "-m", "backbone.weights=null", "data.image_size=16", "data=digits", lrs)

    status = sweep("optim.lr=-1,0.1")
    printed = "".join(capsys.readouterr())
    assert status == 1
    assert "optim.lr=-1.0 must be a positive number" in printed
    assert "OK: training would start with this data." in printed  # the second job, after the failed one
    assert list(tmp_path.iterdir()) == []
    assert sweep("optim.lr=0.01,0.1") == 0
    assert capsys.readouterr().out.count("OK: training would start") == 2
    for chosen, message in [  # refused before any job, with the message check gives without -m
        ("hparams_search=optuna", "hparams_search=optuna: check -m checks the jobs a sweep lists"),
        ("hydra/launcher=slurm", "hydra/launcher=slurm: check runs its checks here"),
    ]:
        assert sweep(chosen) == 1
        printed = "".join(capsys.readouterr())
        assert message in printed and "Splits as training would use them" not in printed
