"""Knowledge distillation (distill.*): the loss, the teacher's input, a distilled run, bad teachers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, run_tool
from transferlab.config.schema import DistillConfig
from transferlab.errors import ConfigError
from transferlab.models.classifier import ImageClassifier
from transferlab.models.distill import distillation_loss, to_teacher_input


def test_distillation_loss_on_hand_made_logits():
    teacher = torch.tensor([[0.0, 0.0]])  # uniform: (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # (1/4, 3/4) at T=1
    label_loss = torch.tensor(0.7)
    total, soft = distillation_loss(student, teacher, label_loss, alpha=0.25, temperature=1.0)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(teacher || student)
    assert soft.item() == pytest.approx(kl, rel=1e-6)
    assert total.item() == pytest.approx(0.25 * 0.7 + 0.75 * kl, rel=1e-6)
    # at T=2 both are softened and the KL is scaled by T^2
    p = 1 / (1 + math.sqrt(3.0))  # softmax([0, ln 3] / 2)[0]
    kl_2 = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    _, soft_2 = distillation_loss(student, teacher, label_loss, alpha=0.25, temperature=2.0)
    assert soft_2.item() == pytest.approx(4 * kl_2, rel=1e-6)
    same, zero = distillation_loss(student, student, label_loss, alpha=0.5, temperature=3.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and same.item() == pytest.approx(0.35)


def test_the_teacher_sees_the_batch_through_its_own_preprocessing():
    pixels = torch.rand(2, 3, 32, 32)
    student = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_size": 32}
    teacher = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_size": 32}
    as_student = (pixels - 0.5) / 0.25
    direct = (pixels - torch.tensor(teacher["mean"]).view(1, 3, 1, 1)) / torch.tensor(teacher["std"]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(to_teacher_input(as_student, student, teacher), direct)
    assert to_teacher_input(as_student, student, {**teacher, "crop_size": 48}).shape == (2, 3, 48, 48)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"teacher": "t.ckpt", "alpha": 1.0}, r"distill.alpha=1.0 must be in \[0, 1\)"),
        ({"teacher": "t.ckpt", "temperature": 0}, "distill.temperature=0 must be a positive number"),
        ({"alpha": 0.3}, "distill.alpha is read only with distill.teacher=<checkpoint>"),
    ],
)
def test_distill_keys_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**values)


@pytest.fixture(scope="module")
def distilled_run(trained_run, tmp_path_factory) -> Path:
    """A MobileNetV3 student at 24 px with its own normalisation, taught by the ResNet-18 of trained_run
    (32 px, ImageNet mean/std): the teacher's inputs are converted."""
    run_dir = tmp_path_factory.mktemp("distilled") / "run"
    overrides = [
        *[o for o in FAST if not o.startswith("data.image_size")],
        "backbone=mobilenet_v3_large",
        "backbone.weights=null",
        "data=imagefolder",
        f"data.root={trained_run.parent / 'data'}",
        "data.image_size=24",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
        "data.batch_size=8",
        "logger=none",
        f"distill.teacher={trained_run / 'checkpoints' / 'best.ckpt'}",
        "distill.alpha=0.3",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_tool("train", *overrides) == 0
    return run_dir


def test_a_distilled_student_checkpoint_holds_no_teacher_and_loads_alone(distilled_run, trained_run):
    best = distilled_run / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    teacher_state = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert not any("teacher" in key for key in state)
    assert not set(state) & {k for k in teacher_state if k.startswith("backbone.")}  # a MobileNet's keys only
    student = ImageClassifier.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    assert student.teacher is None and student.hparams.backbone["name"] == "mobilenet_v3_large"
    assert student(torch.zeros(2, 3, 24, 24)).shape == (2, 3)
    log = (distilled_run / "train.log").read_text()
    assert "Distilling from" in log and "alpha=0.3, temperature=4.0" in log


def test_a_teacher_of_other_classes_is_refused_before_training(trained_run, tmp_path, capsys):
    data = trained_run.parent / "data"
    overrides = [*FAST, "data=imagefolder", f"data.root={data}", "data.classes=[cat,dog]", "logger=none"]
    overrides += [
        f"distill.teacher={trained_run / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    assert run_tool("train", *overrides) != 0
    err = "".join(capsys.readouterr())  # the one-line error is logged
    assert "was trained on 3 classes ['cat', 'dog', 'fox'], but the data has 2 classes" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_teacher_that_is_not_a_checkpoint_names_the_key(tmp_path, capsys):
    junk = tmp_path / "teacher.ckpt"
    junk.write_bytes(b"not a checkpoint")
    overrides = [
        *FAST,
        "data=digits",
        "logger=none",
        f"distill.teacher={junk}",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    assert run_tool("train", *overrides) != 0
    assert f"distill.teacher={junk} is not a PyTorch file" in (err := "".join(capsys.readouterr()))
    assert "give a checkpoint of ours" in err
    missing = [
        *FAST,
        "data=digits",
        f"distill.teacher={tmp_path / 'none.ckpt'}",
        f"hydra.run.dir={tmp_path / 'q'}",
    ]
    assert run_tool("train", *missing) != 0
    assert "none.ckpt: no such file" in "".join(capsys.readouterr())
    folder = [*missing[:-2], f"distill.teacher={tmp_path}", f"hydra.run.dir={tmp_path / 'f'}"]
    assert run_tool("train", *folder) != 0
    assert f"distill.teacher={tmp_path} is a directory, not a checkpoint file" in "".join(capsys.readouterr())


def _distill_with_mixup(trained_run: Path, run_dir: Path, epochs: int) -> list[str]:
    """Student and teacher on trained_run's data, mixup's soft targets, one process, loader in-process
    (num_workers=0: the data a resumed epoch sees is then exactly the uninterrupted run's)."""
    return [
        *[o for o in FAST if not o.startswith(("data.image_size", "trainer.max_epochs"))],
        "data=imagefolder",
        f"data.root={trained_run.parent / 'data'}",
        "data.image_size=32",
        "data.num_workers=0",
        "augment.mixup_alpha=0.4",
        "scheduler=none",
        "logger=none",
        f"trainer.max_epochs={epochs}",
        f"distill.teacher={trained_run / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={run_dir}",
    ]


def test_distillation_with_mixup_resumes_to_the_uninterrupted_metrics(trained_run, tmp_path):
    """Mixup's soft targets in the labels' term, and `resume=` loading the teacher again (it is in no
    checkpoint): 1 epoch then resumed to 2 ends exactly where 2 epochs in one go end."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_tool("train", *_distill_with_mixup(trained_run, whole, epochs=2)) == 0
    assert run_tool("train", *_distill_with_mixup(trained_run, stopped, epochs=1)) == 0
    assert run_tool("train", f"resume={stopped}", "trainer.max_epochs=2") == 0
    finals = [json.loads((run / "metrics.json").read_text()) for run in (whole, stopped)]
    keys = [k for k in finals[0] if k.startswith(("val/", "test/")) and isinstance(finals[0][k], float)]
    assert {"val/loss", "test/loss", "test/acc"} <= set(keys)
    assert {k: finals[1][k] for k in keys} == {k: finals[0][k] for k in keys}
    # the weights after epoch 2: what the teacher's targets shaped (best.ckpt may be epoch 1's)
    last = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for run in (whole, stopped)
    ]
    assert last[0].keys() == last[1].keys()
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    assert (stopped / "train.log").read_text().count("Distilling from") == 2  # loaded again to resume


def test_a_teacher_follows_a_true_precision_run(trained_run, tmp_path):
    """Under trainer.precision=bf16-true Lightning casts each batch to bf16; the teacher (no module of the
    student's) must follow it, or its first convolution refuses the batch."""
    run_dir = tmp_path / "bf16"
    overrides = [
        *[o for o in FAST if not o.startswith("data.image_size")],
        "data=imagefolder",
        f"data.root={trained_run.parent / 'data'}",
        "data.image_size=32",
        "trainer.precision=bf16-true",
        "logger=none",
        f"distill.teacher={trained_run / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_tool("train", *overrides) == 0, (run_dir / "error.txt").read_text()[-2000:]
    assert math.isfinite(json.loads((run_dir / "metrics.json").read_text())["val/loss"])


def test_resuming_without_its_teacher_says_to_put_it_back(tmp_path):
    from transferlab.errors import ConfigError
    from transferlab.resume import check_resumable

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"task_name: train\ndistill:\n  teacher: {tmp_path / 'moved.ckpt'}\n"
    )
    with pytest.raises(
        ConfigError, match=r"distill.teacher=.*moved.ckpt, which is no longer there; put that"
    ):
        check_resumable(run, "train")
