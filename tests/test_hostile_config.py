"""Hostile input, config and launch: every mistake ends in one message naming the key or path, before
any data is read where it can be; nothing the user owns is written over; no setting is ignored.

Each case is built here on the fly and checks the exact outcome: exit status (in-process runs of the
real tools), the message's key, no traceback, and files byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, compose_config, run_tool, validate
from transferlab.config.schema import METRIC_DIRECTIONS
from transferlab.errors import ConfigError
from transferlab.launch import claim_directory
from transferlab.models.metrics import classification_metrics


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256 of its bytes), and every folder."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


NOWHERE = Path("/nonexistent/run")  # validation writes nothing


def refused(overrides: list[str], match: str) -> None:
    """The config is refused at validation (before data is read) with a message matching `match`."""
    with pytest.raises(ConfigError, match=match):
        validate(compose_config([*FAST, *overrides], NOWHERE))


# --- keys that nothing would read, and values out of range ------------------------------------------

IGNORED_OR_UNREAD = [
    (["data.root=/my/images"], r"data.root='/my/images' is not read by data=digits: .*data=imagefolder"),
    (["data=cifar10", "data.root=/c", "data.scan=full"], r"data.scan='full' is not read by data=cifar10"),
    (["data=digits", "data.skip_bad=true"], r"data.skip_bad=True is not read by data=digits"),
    (["+data.batchsize=8"], r"data.batchsize is not a key of data=digits; its keys are: .*batch_size"),
    (["+optim.lrr=0.1"], r"optim.lrr is not a key of optim=sgd"),
    (["+seeds=3"], r"seeds is not a key of train.yaml"),
    (["data.classes=[]"], r"data.classes=\[\] must list at least 2 classes"),
    (["data.image_size=4"], r"data.image_size=4 must be an integer >= 8"),
    (["seed=-1"], r"seed=-1 must be an integer >= 0"),
    (["loss.focal_gamma=3"], r"loss.focal_gamma=3.0 is read only with data.imbalance=focal"),
    (["tune.num_training=7"], r"tune.num_training is read only with tune.lr_find=true"),
    (["augment=none", "augment.crop_scale=[0.2,0.5]"], r"augment.crop_scale is not read by augment=none"),
    (["augment.crop_scale=[0.2,0.5]"], r"augment.crop_scale=\[0.2, 0.5\] lies below data.min_crop_scale=0.8"),
    (["backbone.trust_file=true"], r"backbone.trust_file=true is read only for a local weights file"),
    (
        ["trainer.default_root_dir=/elsewhere"],
        r"trainer.default_root_dir=/elsewhere: a run writes into its own",
    ),
    (["data.std=[0,0,0]"], r"data.std=\[0.0, 0.0, 0.0\] must be positive"),
    (
        ["callbacks=early_stopping", "callbacks.early_stopping.monitor=val/bogus"],
        r"callbacks.early_stopping.monitor='val/bogus' is not a metric",
    ),
    (
        ["tune.lr_find=true", "ckpt_path=/x.ckpt"],
        r"tune.lr_find=true finds a learning rate for a fresh start",
    ),
    (["data.split_seed=4294967296"], r"data.split_seed=4294967296 must be at most 4294967295"),
    (["freeze=linear_probe", "optim.backbone_lr_mult=0.1"], r"optim.backbone_lr_mult=0.1 has no effect"),
    (["freeze=linear_probe", "optim.layer_decay=0.7"], r"optim.layer_decay=0.7 has no effect"),
    (["freeze=partial", "freeze.trainable_blocks=0", "freeze.bn=eval"], r"freeze.bn=eval has no effect"),
]


@pytest.mark.parametrize(("overrides", "match"), IGNORED_OR_UNREAD)
def test_settings_nothing_reads_are_refused(overrides, match):
    refused(overrides, match)


RUN_LENGTH = [
    (["trainer.max_epochs=0"], r"trainer.max_epochs=0 trains nothing"),
    (["trainer.max_epochs=-1"], r"trainer.max_epochs=-1 must be an integer >= 1"),
    (["trainer.max_epochs=null"], r"trainer.max_epochs=None must be an integer >= 1"),
    (["trainer.limit_train_batches=0"], r"trainer.limit_train_batches=0 trains nothing"),
    (["trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    (["trainer.limit_val_batches=0"], r"trainer.limit_val_batches=0 never validates"),
    (["trainer.check_val_every_n_epoch=5"], r"check_val_every_n_epoch=5 is more than trainer.max_epochs=1"),
]


@pytest.mark.parametrize(("overrides", "match"), RUN_LENGTH)
def test_runs_that_would_train_or_validate_nothing_are_refused(overrides, match):
    refused(overrides, match)


NOT_FINITE = [  # every comparison with nan is false, so a range check alone lets it through
    (["optim.lr=nan"], r"optim.lr=nan must be a finite number"),
    (["optim.lr=inf"], r"optim.lr=inf must be a finite number"),
    (["optim.weight_decay=nan"], r"optim.weight_decay=nan must be a finite number"),
    (["augment.mixup_alpha=nan"], r"augment.mixup_alpha=nan must be a finite number"),
    (["trainer.gradient_clip_val=nan"], r"trainer.gradient_clip_val=nan must be a finite number"),
    (["optim.lr=${oc.env:TRANSFERLAB_NO_SUCH_VARIABLE}"], r"optim.lr: .*TRANSFERLAB_NO_SUCH_VARIABLE"),
    (["data.batch_size=${no.such.key}"], r"data.batch_size: .*no.such.key"),
    (["optim=sgd", "optim.momentum=2"], r"optim.momentum=2.0 must be in \[0, 1\)"),
    (
        ["scheduler=cosine", "scheduler.warmup_epochs=-inf"],
        r"scheduler.warmup_epochs=-inf must be a finite number",
    ),
]


@pytest.mark.parametrize(("overrides", "match"), NOT_FINITE)
def test_nan_and_inf_are_refused_wherever_they_are_typed(overrides, match):
    refused(overrides, match)


# --- metrics: names the model logs, and their better direction ---------------------------------------


def test_the_metric_table_is_what_the_model_logs():
    logged = set(classification_metrics(10)) | {"loss"}
    assert logged == set(METRIC_DIRECTIONS)


def test_optimized_mode_follows_the_metric_and_a_contradiction_is_refused():
    for metric, mode in (("val/loss", "min"), ("val/acc", "max"), ("val/f1", "max")):
        cfg = compose_config([*FAST, f"optimized_metric={metric}"], NOWHERE)
        assert validate(cfg).optimized_mode == mode
        assert cfg.callbacks.model_checkpoint.mode == mode  # what best.ckpt is chosen by
    refused(["optimized_metric=val/loss", "optimized_mode=max"], r"optimized_mode=max contradicts .*lower")
    refused(["optimized_metric=val/acc", "optimized_mode=min"], r"optimized_mode=min contradicts .*higher")
    refused(
        ["optimized_metric=val/acc1"], r"optimized_metric='val/acc1' is not a metric .*: val/loss, val/acc"
    )
    refused(["optimized_metric=test/acc"], r"optimized_metric='test/acc' is not a metric logged at each val")
    refused(
        ["scheduler=plateau", "optimized_metric=val/loss", "scheduler.mode=max"],
        r"scheduler.mode=max contradicts scheduler.monitor=val/loss",
    )
    cfg = compose_config(
        [*FAST, "hparams_search=optuna", "optimized_metric=val/loss"], NOWHERE, with_hydra=True
    )
    assert cfg.hydra.sweeper.direction == "minimize"


# --- in-process runs of the tools: the exit status and the one message ------------------------------


def run(tool: str, overrides: list[str], capsys) -> tuple[int, str]:
    status = run_tool(tool, *overrides)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return status, text


def test_errors_found_once_data_and_model_exist_stop_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cases = [  # (overrides, message); each stops before a training step
        (["trainer.accelerator=gpu"], "trainer: No supported gpu backend found"),
        (["trainer.devices=abc"], "trainer.devices='abc' is not valid"),
        (["data.classes=[0,1,2]", "optimized_metric=val/acc_top5"], "logged only with more than 5 classes"),
    ]
    for i, (overrides, message) in enumerate(cases):
        status, text = run("train", [*FAST, *overrides, f"hydra.run.dir={run_dir}{i}"], capsys)
        assert status == 2 and message in text
        assert not (Path(f"{run_dir}{i}") / "checkpoints").exists()


def test_an_input_size_the_backbone_cannot_take_is_refused(capsys):
    pytest.importorskip("timm")
    overrides = ["backbone=timm", "backbone.name=vit_tiny_patch16_224", "data.image_size=32"]
    status, text = run("check", [*FAST, *overrides], capsys)
    assert status == 1
    assert "data.image_size=32 does not fit backbone vit_tiny_patch16_224" in text


def test_check_and_train_give_the_same_verdict(tmp_path, capsys):
    """Pretrained weights that are not cached offline: the data is fine, training would still stop."""
    check_status, check_text = run("check", ["data.classes=[0,1]"], capsys)
    train_status, train_text = run("train", ["data.classes=[0,1]", f"hydra.run.dir={tmp_path}/r"], capsys)
    assert (check_status, train_status) == (1, 2)
    reason = "resnet18 weights IMAGENET1K_V1 are not cached and TRANSFERLAB_OFFLINE=1"
    assert reason in check_text and reason in train_text
    status, text = run("check", [*FAST, "data.classes=[0,1]"], capsys)  # random init: nothing to load
    assert status == 0 and "OK: training would start" in text


def test_sweep_settings_without_multirun_are_refused(tmp_path, capsys):
    for overrides, message in (
        (["hparams_search=optuna"], "hparams_search=optuna runs a sweep: add -m"),
        (["hydra/launcher=slurm"], "hydra/launcher=slurm launches the jobs of a sweep: add -m"),
    ):
        status, text = run("train", [*FAST, *overrides, f"paths.output_root={tmp_path}"], capsys)
        assert status == 1 and message in text
    assert list(tmp_path.iterdir()) == []  # refused before any directory was made


# --- run directories: never the user's, one run each ---------------------------------------------------


def test_a_folder_that_is_not_new_is_never_written_into(tmp_path, capsys):
    user = tmp_path / "mine"
    (user / "splits").mkdir(parents=True)
    (user / "splits" / "train.txt").write_text("my own list\n")
    (tmp_path / "a_file").write_text("not a folder")
    before = snapshot(tmp_path)
    for run_dir, message in (
        (user, "already exists and is not empty (it holds 'splits')"),
        (tmp_path / "a_file", "is a file, not a directory"),
        (tmp_path / "a_file" / "run", "cannot create the output directory"),
    ):
        status, text = run("train", [*FAST, f"hydra.run.dir={run_dir}"], capsys)
        assert status == 1 and text.startswith("Error: hydra.run.dir: ")
        assert message in text and str(run_dir) in text
    sweep = ["-m", *FAST, f"hydra.sweep.dir={user}", "seed=1,2"]
    status, text = run("train", sweep, capsys)
    assert status == 1 and "hydra.sweep.dir" in text and "is not empty" in text
    assert snapshot(tmp_path) == before


def test_an_uncreatable_output_root_is_one_message(tmp_path, capsys):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder would be")
    status, text = run("train", [*FAST, f"paths.output_root={blocker}"], capsys)
    assert status == 1 and f"cannot create the output directory {blocker}" in text
    assert "Choose a writable paths.output_root" in text


def _claim(directory: str, barrier, results) -> None:
    barrier.wait()  # all processes try at the same moment
    try:
        claim_directory(directory, marker=".hydra")
        results.put("claimed")
    except ConfigError as error:
        results.put(str(error))


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_two_runs_started_together_on_one_directory_never_share_it():
    """The guard's claim, raced by processes started at the same instant, 12 times: always one winner."""
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(12):
            directory = os.path.join(tmp, str(attempt))
            if attempt % 2:  # an empty folder made beforehand is claimed the same way
                os.mkdir(directory)
            barrier, results = context.Barrier(2), context.Queue()
            workers = [context.Process(target=_claim, args=(directory, barrier, results)) for _ in range(2)]
            for worker in workers:
                worker.start()
            outcomes = sorted(results.get(timeout=30) for _ in workers)
            for worker in workers:
                worker.join()
            assert outcomes.count("claimed") == 1, outcomes
            assert all("claimed by another run" in o or "not empty" in o for o in outcomes if o != "claimed")


def test_two_real_runs_on_one_directory(tmp_path):
    """Two `transferlab train` processes, started together with the same hydra.run.dir: one is refused
    before writing anything; the other runs (here it stops on its own config error, after the claim)."""
    import subprocess

    run_dir = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFERLAB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "transferlab.tools.train",
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=0",
    ]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [(proc.wait(timeout=120), proc.stdout.read()) for proc in procs]
    statuses = sorted(status for status, _ in outputs)
    assert statuses == [1, 2], outputs  # 1: refused by the guard; 2: the winner's config error
    loser = next(text for status, text in outputs if status == 1)
    assert "hydra.run.dir" in loser and "Traceback" not in loser
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "error.txt", "train.log"]


def test_a_fraction_the_folder_makes_moot_is_refused(tmp_path, capsys):
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    data = ["data=imagefolder", f"data.root={tmp_path}"]
    status, text = run("check", [*FAST, *data, "data.val_fraction=0.3"], capsys)
    assert (
        status == 1 and f"data.val_fraction=0.3 is not used: {tmp_path / 'val'} holds the val images" in text
    )
    status, text = run("check", [*FAST, *data, "data.test_fraction=0.2"], capsys)
    assert status == 0  # no test/: the share is held out from train


def test_outputs_keep_the_users_umask(tmp_path):
    from transferlab.files import write_json

    previous = os.umask(0o027)
    try:
        claim_directory(tmp_path / "run", marker=".hydra")
        write_json(
            tmp_path / "run" / "metrics.json", {"val/acc": 1.0}
        )  # checkpoints are written the same way
    finally:
        os.umask(previous)
    assert (tmp_path / "run" / "metrics.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / ".hydra").stat().st_mode & 0o777 == 0o750


def test_class_names_that_are_numbers_are_chosen_by_name_only(tmp_path, capsys):
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path, {"train": {name: 5 for name in ("10", "2", "33", "5")}})
    data = ["data=imagefolder", f"data.root={tmp_path}"]
    status, text = run("check", [*FAST, *data, "data.classes=[2,33]"], capsys)
    assert status == 0 and "Splits as training would use them (2 classes)" in text
    status, text = run("check", [*FAST, *data, "data.classes=[2,3]"], capsys)  # 3 is no folder's name
    assert status == 1 and "data.classes: 3 is not a class name" in text and "Classes: 10, 2, 33, 5" in text


def test_sweep_jobs_never_share_a_directory_and_chdir_is_refused(tmp_path, capsys):
    before = snapshot(tmp_path)
    for override in ("hydra.sweep.subdir=same", f"hydra.sweep.subdir={tmp_path}/mine/${{hydra.job.num}}"):
        sweep = ["-m", *FAST, f"hydra.sweep.dir={tmp_path}/sweep", override, "seed=1,2"]
        status, text = run("train", sweep, capsys)
        assert status == 1 and "must be a relative path holding ${hydra.job.num}" in text
    status, text = run("train", [*FAST, f"hydra.run.dir={tmp_path}/r", "hydra.job.chdir=true"], capsys)
    assert status == 1 and "hydra.job.chdir=true is not supported" in text
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One short run of 2 epochs, for the resume= and ckpt_path= cases (each case copies what it changes)."""
    run_dir = tmp_path_factory.mktemp("hostile_config") / "run"
    overrides = [*FAST, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"]
    assert run_tool("train", *[o for o in overrides if o != "trainer.max_epochs=1"]) == 0
    return run_dir


def test_a_run_in_use_is_not_resumed_by_another(finished_run, capsys):
    from transferlab.launch import lock_run, release_run_locks

    before = snapshot(finished_run)
    lock_run(finished_run)  # as a run still going in it holds it (the OS frees it when that process ends)
    try:
        status, text = run("train", [f"resume={finished_run}", "trainer.max_epochs=3"], capsys)
    finally:
        release_run_locks()
    assert status == 1 and f"{finished_run} is in use: another run (or resume=) is running in it now" in text
    assert snapshot(finished_run) == before


def test_a_checkpoint_with_no_epochs_left_is_refused(finished_run, tmp_path, capsys):
    def outcome_files() -> dict[str, str]:  # all but the log and the refused attempt's .hydra/resume_<time>
        return {
            path: digest
            for path, digest in snapshot(finished_run).items()
            if path != "train.log" and not path.startswith(".hydra/resume_")
        }

    last = finished_run / "checkpoints" / "last.ckpt"
    before = outcome_files()
    status, text = run("train", [f"resume={finished_run}"], capsys)  # max_epochs=2, both trained
    assert status == 2 and "has completed 2 epochs, so trainer.max_epochs=2 leaves none to train" in text
    assert outcome_files() == before  # still a finished run: its metrics.json in place, no error.txt
    status, text = run("train", [*FAST, f"ckpt_path={last}", f"hydra.run.dir={tmp_path}/new"], capsys)
    assert status == 2 and f"ckpt_path={last} has completed 2 epochs" in text


def test_a_moved_run_is_not_resumed_in_its_new_place(finished_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    status, text = run("train", [f"resume={copy}", "trainer.max_epochs=3"], capsys)
    assert status == 1 and f"this run was saved in {finished_run} and has been moved or copied" in text
    assert f"ckpt_path={copy / 'checkpoints' / 'last.ckpt'}" in text


def test_a_relative_data_root_is_kept_absolute(tmp_path, monkeypatch):
    from transferlab.config import parse_group

    monkeypatch.chdir(tmp_path)
    assert parse_group("data", {"name": "imagefolder", "root": "images"}).root == str(tmp_path / "images")


def test_folders_beside_train_are_not_silently_left_out(tmp_path, capsys):
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path, {"train": {"cat": 4, "dog": 4}, ".": {"bird": 4}})
    status, text = run("check", [*FAST, "data=imagefolder", f"data.root={tmp_path}"], capsys)
    assert status == 1 and "and also bird/ beside it, which would not be read" in text


def test_the_summary_never_writes_over_files_of_yours(tmp_path):
    from transferlab.sweep.summary import write_summary

    sweep = tmp_path / "sweep" / "0"
    (sweep / ".hydra").mkdir(parents=True)
    (sweep / "metrics.json").write_text('{"val/acc": 0.5, "test/acc": 0.4}')
    (sweep.parent / "multirun.yaml").write_text("hydra: {}\n")  # a sweep's folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.csv").write_text("my own table\n")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    for out, message in ((mine, "already holds summary.csv"), (tmp_path / "afile", "is a file")):
        with pytest.raises(SystemExit, match=message):
            write_summary(sweep.parent, out=out)
    with pytest.raises(
        SystemExit, match=r"metric=test/bogus is not a metric of these jobs; they have: test/acc, val/acc"
    ):
        write_summary(sweep.parent, metric="test/bogus")
    assert snapshot(tmp_path) == before
    write_summary(sweep.parent)  # its own folder: written, and again
    assert "val/acc" in write_summary(sweep.parent)


def test_one_class_and_a_weights_folder_are_named(tmp_path, capsys):
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "one", {".": {"cat": 6}})
    status, text = run("check", [*FAST, "data=imagefolder", f"data.root={tmp_path / 'one'}"], capsys)
    assert status == 1 and "has 1 class (cat): a classifier needs at least 2 class folders" in text
    status, text = run("check", [*FAST, f"backbone.weights={tmp_path}"], capsys)
    assert status == 1 and f"backbone.weights={tmp_path} is a directory" in text
