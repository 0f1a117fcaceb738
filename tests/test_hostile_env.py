"""Failures that config checks cannot catch: a bug deep inside, a disk that fills during a save, an image
that breaks in a loader worker, a checkpoint file that is not one. Each ends in one line (exit status
!= 0), its traceback in the run's error.txt, earlier files untouched."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import FAST, ROOT, run_tool, write_image_folder
from transferlab.checkpoints import read_checkpoint
from transferlab.errors import ConfigError, describe
from transferlab.sweep.summary import read_job


class Boom(L.Callback):
    """Raises a RuntimeError after training batch `batch`: a bug deep inside a run."""

    def __init__(self, batch: int = 0) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.batch:
            raise RuntimeError(f"boom at step {batch_idx}")


TINY = [*FAST, "backbone=timm", "backbone.name=test_resnet"]  # 0.5 M weights: 4 MB checkpoints
BOOM = ["+callbacks.boom._target_=tests.test_hostile_env.Boom"]
RANDOM_BYTES = np.random.default_rng(0).bytes(256)  # starts neither as a zip nor as a pickle


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """A tool in a new process: what its terminal shows."""
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Files of this process may grow to `size` bytes: a write past it fails with EFBIG (Python ignores
    SIGXFSZ), as on a disk that fills up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _checkpoints(run: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}


def _eval_bug(monkeypatch) -> None:
    """eval fails with a bug of ours, before it reads any file."""
    import transferlab.evaluation as evaluation

    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(evaluation, "parse_eval_config", bug)


def test_a_bug_deep_inside_is_one_line_and_its_traceback_is_in_error_txt(tmp_path):
    run = tmp_path / "run"
    proc = _run_cli("train.py", *TINY, *BOOM, "trainer.num_sanity_val_steps=0", f"hydra.run.dir={run}")
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 1, terminal
    assert "Traceback" not in terminal
    [line] = [line for line in terminal.splitlines() if "boom at step 0" in line]
    assert "RuntimeError: boom at step 0 (raised at tests/test_hostile_env.py:" in line
    assert f"(full traceback: {run / 'error.txt'})" in line
    saved = (run / "error.txt").read_text()
    assert saved.startswith("Traceback") and "on_train_batch_end" in saved
    assert read_job(run).status == "failed"


def test_hydra_full_error_shows_the_traceback_too(tmp_path, monkeypatch):
    _eval_bug(monkeypatch)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    run = tmp_path / "eval"
    with pytest.raises(KeyError, match="a bug") as raised:  # Hydra lets Python print it
        run_tool("eval", "ckpt_path=x.ckpt", f"hydra.run.dir={run}")
    assert raised.value.__notes__ == [f"The traceback is saved in {run / 'error.txt'}"]
    assert "KeyError: 'a bug'" in (run / "error.txt").read_text()


def test_a_failing_job_of_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    _eval_bug(monkeypatch)
    sweep = tmp_path / "sweep"
    assert run_tool("eval", "-m", "ckpt_path=x.ckpt", "split=val,test", f"hydra.sweep.dir={sweep}") == 1
    assert [read_job(sweep / job).status for job in ("0", "1")] == ["failed", "failed"]


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, capfd):
    run = tmp_path / "run"
    assert run_tool("train", *TINY, f"hydra.run.dir={run}") == 0
    before = _checkpoints(run)
    capfd.readouterr()
    with file_size_limit(1_000_000):  # a second epoch: its first checkpoint (4 MB) does not fit
        status = run_tool("train", f"resume={run}", "trainer.max_epochs=2")
    terminal = "".join(capfd.readouterr())
    assert status == 2, terminal
    assert "Traceback" not in terminal and "unexpected pos" not in terminal
    [line] = [line for line in terminal.splitlines() if "ResourceError" in line]
    written = re.search(r"cannot write (\S+) \(the previous (\S+) is unchanged\): file too large", line)
    assert written and pathlib.Path(written[1]).parent == run / "checkpoints", line
    assert line.endswith("[EFBIG]")
    assert _checkpoints(run) == before  # byte-identical, and no temporary file left
    assert "EFBIG" in (run / "error.txt").read_text()
    assert (
        read_job(run).status == "failed"
    )  # the first attempt's metrics.json is kept aside, not taken for this one's
    [first_metrics] = run.glob("metrics.*.json")

    # the same resume with room to write succeeds: the failed attempt's error is kept, out of the way
    assert run_tool("train", f"resume={run}", "trainer.max_epochs=2") == 0
    assert read_job(run).status == "ok"
    [kept] = run.glob("error.*.txt")
    assert "EFBIG" in kept.read_text()
    assert json.loads(first_metrics.read_text())["epochs_trained"] == 1


def test_an_image_that_breaks_in_a_loader_worker_is_one_line(tmp_path, monkeypatch, capsys):
    import transferlab.data.datasets as datasets

    root = write_image_folder(
        tmp_path / "images", {s: {"a": 4, "b": 4} for s in ("train", "val", "test")}, size=16
    )
    scan = datasets.scan_image_folder

    def scan_then_damage(*args, **kwargs):  # the files break after the run's scan found them good
        found = scan(*args, **kwargs)
        for image in root.rglob("*.png"):
            image.write_bytes(b"not an image any more")
        return found

    monkeypatch.setattr(datasets, "scan_image_folder", scan_then_damage)
    # torch joins a loader's workers for MP_STATUS_CHECK_INTERVAL (5 s) when the loader whose worker
    # failed is collected (not at the exit of a command-line run): shortened, and collected here
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    run = tmp_path / "run"
    overrides = ["data=imagefolder", f"data.root={root}", "data.num_workers=1", f"hydra.run.dir={run}"]
    assert run_tool("train", *TINY, *overrides) == 2
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "DataError" in line]
    assert "cannot be read as an image" in line and "DataLoader worker" not in line
    assert "Original Traceback" not in out and "Traceback" not in out
    saved = (run / "error.txt").read_text()
    assert "Caught DataError in DataLoader worker process 0" in saved and "load_rgb" in saved
    gc.collect()


def test_eval_keeps_its_traceback_in_its_own_run_directory(tmp_path, monkeypatch, capsys):
    _eval_bug(monkeypatch)
    run = tmp_path / "eval"
    assert run_tool("eval", "ckpt_path=x.ckpt", f"hydra.run.dir={run}") == 1
    [line] = [line for line in capsys.readouterr().out.splitlines() if "KeyError" in line]
    assert "KeyError: 'a bug' (raised at tests/test_hostile_env.py:" in line
    assert line.endswith(f"in bug) (full traceback: {run / 'error.txt'})")
    assert "KeyError: 'a bug'" in (run / "error.txt").read_text()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("random bytes", "is not a PyTorch file"),
        ("text", "is not a PyTorch file"),
        ("empty", r"is empty \(0 bytes\)"),
        ("truncated", "is truncated"),
        ("directory", "is a directory, not a checkpoint file"),
        ("missing", ": no such file"),
        ("state_dict", "is a plain state_dict"),
        ("other model", "is a Lightning checkpoint of another model"),
        ("zip", "is a zip archive, not a PyTorch file: give a checkpoint of ours"),
        ("torchscript", r"is a TorchScript model .*eval and predict take those as model_path="),
        ("needs unpickling", r"holds pathlib.PurePosixPath, .* add trust_checkpoint=true"),
    ],
)
def test_each_kind_of_bad_checkpoint_has_its_own_message(tmp_path, kind, message):
    path = tmp_path / "x.ckpt"
    lightning = {"state_dict": {"w": torch.ones(1)}, "pytorch-lightning_version": L.__version__}
    torch.save({**lightning, "hyper_parameters": {"class_names": ["a"]}}, tmp_path / "ours.ckpt")
    real = (tmp_path / "ours.ckpt").read_bytes()
    assert read_checkpoint(tmp_path / "ours.ckpt")["hyper_parameters"]["class_names"] == ["a"]
    make = {
        "random bytes": lambda: path.write_bytes(RANDOM_BYTES),
        "text": lambda: path.write_text("model = resnet18\n"),
        "empty": lambda: path.write_bytes(b""),
        "truncated": lambda: path.write_bytes(real[: len(real) // 2]),
        "directory": lambda: path.mkdir(),
        "missing": lambda: None,
        "state_dict": lambda: torch.save({"fc.weight": torch.ones(2, 2)}, path),
        "other model": lambda: torch.save({**lightning, "hyper_parameters": {"lr": 0.1}}, path),
        "zip": lambda: zipfile.ZipFile(path, "w").writestr("notes.txt", "not a checkpoint"),
        "torchscript": lambda: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path)),
        "needs unpickling": lambda: torch.save(
            {**lightning, "hyper_parameters": {"class_names": ["a"], "root": pathlib.PurePosixPath("/")}},
            path,
        ),
    }
    make[kind]()
    with pytest.raises(ConfigError, match=message) as raised:
        read_checkpoint(path)
    assert "\n" not in str(raised.value)
    if kind == "torchscript":  # loaded with full unpickling, torch opens it: still named for what it is
        with pytest.raises(ConfigError, match=r"is a TorchScript model .* take it as model_path="):
            read_checkpoint(path, trust=True)
    assert ("trust_checkpoint" in str(raised.value)) == (kind == "needs unpickling")
    if kind == "needs unpickling":
        assert read_checkpoint(path, trust=True)["hyper_parameters"]["class_names"] == ["a"]


def test_eval_of_random_bytes_is_one_line_without_the_trust_hint(tmp_path, capsys):
    ckpt = tmp_path / "random.ckpt"
    ckpt.write_bytes(RANDOM_BYTES)
    run = tmp_path / "eval"
    assert run_tool("eval", f"ckpt_path={ckpt}", f"hydra.run.dir={run}") == 2
    [line] = [line for line in capsys.readouterr().out.splitlines() if "ConfigError" in line]
    assert f"ConfigError: ckpt_path={ckpt} is not a PyTorch file (not what torch.save writes" in line
    assert "trust_checkpoint" not in line
    assert "ConfigError" in (run / "error.txt").read_text()


def test_an_error_txt_that_cannot_be_written_does_not_hide_the_error(tmp_path, monkeypatch, capsys):
    import transferlab.tools.app as app

    def disk_full(directory, error):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _eval_bug(monkeypatch)
    monkeypatch.setattr(app, "save_traceback", disk_full)
    assert run_tool("eval", "ckpt_path=x.ckpt", f"hydra.run.dir={tmp_path / 'eval'}") == 1
    [line] = [line for line in capsys.readouterr().out.splitlines() if "KeyError" in line]
    assert "KeyError: 'a bug' (raised at tests/test_hostile_env.py:" in line
    assert "(its traceback could not be saved: OSError: no space left on device [ENOSPC]" in line


def test_a_bug_in_a_loader_worker_is_told_as_the_original_error():
    from torch._utils import ExceptionWrapper  # how the DataLoader hands a worker's error over

    try:
        raise ZeroDivisionError("division by zero\nsecond line")
    except ZeroDivisionError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(ZeroDivisionError) as raised:
        wrapped.reraise()
    assert re.fullmatch(
        r"ZeroDivisionError in DataLoader worker process 3: division by zero \(raised at "
        r"tests/test_hostile_env.py:\d+ in test_a_bug_in_a_loader_worker_is_told_as_the_original_error\)",
        describe(raised.value),
    )


@pytest.mark.parametrize("earlier", ["failed", "finished"])
def test_a_failure_before_the_job_begins_keeps_a_finished_run_and_records_a_failed_ones(tmp_path, earlier):
    """run_job: a finished run (metrics.json) refused before its job begins keeps its outcome, no
    error.txt; an earlier failed attempt (a SLURM requeue, a resume after a crash) gets this attempt's
    error.txt, its own kept aside."""
    from omegaconf import OmegaConf

    from transferlab.training import run_job

    outcome = {"failed": "error.txt", "finished": "metrics.json"}[earlier]
    (tmp_path / outcome).write_text("the earlier attempt's")

    def refused_before_begin(output_dir, begin):
        raise ConfigError("data.root=/gone: no such folder")

    with pytest.raises(ConfigError):
        run_job(OmegaConf.create({"paths": {"output_dir": str(tmp_path)}}), refused_before_begin)
    if earlier == "finished":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    else:
        assert "data.root=/gone" in (tmp_path / "error.txt").read_text()
        [kept] = tmp_path.glob("error.*.txt")
        assert kept.read_text() == "the earlier attempt's"


def test_a_message_whose_first_line_ends_in_a_colon_keeps_its_reason():
    """Hydra's InstantiationException says "Error in call to target 'X':" and gives the reason below."""
    error = RuntimeError("Error in call to target 'pkg.Thing':\nTypeError('bad argument')\nfull_key: a.b")
    assert describe(error) == "RuntimeError: Error in call to target 'pkg.Thing': TypeError('bad argument')"
    assert describe(RuntimeError("one line\nsecond")) == "RuntimeError: one line"
