"""Freeze strategies, stages, parameter groups, schedulers and resume, checked after real optimizer steps."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.conftest import compose_config, validate
from transferlab.build import build_datamodule
from transferlab.config import parse_group
from transferlab.errors import ConfigError
from transferlab.finetune.freeze import FreezePlan, freeze_plan
from transferlab.finetune.optim import stage_lr_scales
from transferlab.models.classifier import ImageClassifier
from transferlab.training import prepare_model

# resnet18 stages: conv1+bn1, layer1, layer2, layer3, layer4
TINY = [
    "backbone.weights=null",
    "data.image_size=16",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "optim.lr=0.05",
]


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (FreezePlan("full", 5), [0, 0, 0, 0, 0]),
        (FreezePlan("linear_probe", 5), [None] * 5),
        (FreezePlan("partial", 5, trainable_blocks=2), [None, None, None, 0, 0]),
        (FreezePlan("gradual", 5, milestones=(2, 5)), [5, 5, 5, 5, 2]),
        (FreezePlan("gradual", 5, milestones=(1, 3, 4), unfreeze_per_milestone=2), [4, 3, 3, 1, 1]),
        (FreezePlan("gradual", 5, milestones=(3,)), [3, 3, 3, 3, 3]),
    ],
)
def test_unfreeze_epochs(plan, expected):
    assert [plan.unfreeze_epoch(i) for i in range(5)] == expected


def test_trainable_blocks_beyond_the_stages_names_them():
    with pytest.raises(
        ConfigError, match=r"trainable_blocks=6 but this backbone has 5 stages: conv1\+bn1, layer1"
    ):
        freeze_plan(
            parse_group("freeze", {"name": "partial", "trainable_blocks": 6}),
            ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"],
        )


def test_layer_decay_scales():
    assert stage_lr_scales(3, 0.1, 0.5) == pytest.approx([0.1 * 0.125, 0.1 * 0.25, 0.1 * 0.5])
    assert stage_lr_scales(2, 1.0, None) == [1.0, 1.0]


class Recorder(Callback):
    """Per epoch: the LR of each group at the first step, and the backbone state at the end."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, dict[str, float]] = {}
        self.requires_grad: dict[int, dict[str, bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.lrs[trainer.current_epoch] = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        self.states[epoch] = copy.deepcopy(pl_module.backbone.state_dict())
        self.requires_grad[epoch] = {n: p.requires_grad for n, p in pl_module.backbone.named_parameters()}


def _setup(tmp_path: Path, *overrides: str) -> tuple[ImageClassifier, L.LightningDataModule, dict]:
    config = validate(compose_config([*TINY, *overrides], tmp_path))
    L.seed_everything(0)
    datamodule = build_datamodule(config.data, config.backbone, config.seed)
    datamodule.setup("fit")
    model = prepare_model(config, datamodule)
    return model, datamodule, copy.deepcopy(model.backbone.state_dict())


def _fit(
    model, datamodule, tmp_path, epochs: int, ckpt_path=None, callbacks=(), **trainer_kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def _stage_of(model: ImageClassifier) -> dict[str, int]:
    """Stage index of every backbone state key (parameters and batch-norm buffers)."""
    owner: dict[str, int] = {}
    for index, stage in enumerate(model.stages):
        for param in stage.param_names:
            owner[param] = index
            module = param.rpartition(".")[0]
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                owner[f"{module}.{buffer}"] = index
    return owner


def _changed_stages(model: ImageClassifier, before: dict, after: dict) -> set[int]:
    owner = _stage_of(model)
    return {owner[key] for key in before if not torch.equal(before[key], after[key])}


def test_linear_probe_keeps_backbone_and_bn_statistics_bit_identical(tmp_path):
    model, datamodule, before = _setup(tmp_path, "freeze=linear_probe")
    head_before = copy.deepcopy(model.head.state_dict())
    trainer = _fit(model, datamodule, tmp_path, epochs=2)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running stats
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    optimizer = trainer.optimizers[0]
    assert {g["name"] for g in optimizer.param_groups} == {"head", "head.no_decay"}
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_partial_trains_only_the_last_stages(tmp_path, bn):
    model, datamodule, before = _setup(
        tmp_path, "freeze=partial", "freeze.trainable_blocks=2", f"freeze.bn={bn}"
    )
    trainer = _fit(model, datamodule, tmp_path, epochs=1)
    after = model.backbone.state_dict()
    assert _changed_stages(model, before, after) == {3, 4}
    stats = [k for k in before if k.endswith("running_mean")]
    frozen_stats = [k for k in stats if k.startswith(("bn1", "layer1", "layer2"))]
    trained_stats = [k for k in stats if k.startswith(("layer3", "layer4"))]
    assert all(torch.equal(before[k], after[k]) for k in frozen_stats)
    moved = [not torch.equal(before[k], after[k]) for k in trained_stats]
    assert all(moved) if bn == "train" else not any(moved)
    groups = {g["name"] for g in trainer.optimizers[0].param_groups}
    assert groups == {
        "backbone.3.layer3",
        "backbone.3.layer3.no_decay",
        "backbone.4.layer4",
        "backbone.4.layer4.no_decay",
        "head",
        "head.no_decay",
    }


def test_groups_and_lrs_follow_layer_decay_and_backbone_mult(tmp_path):
    model, datamodule, _ = _setup(
        tmp_path,
        "freeze=full",
        "optim.lr=0.1",
        "optim.layer_decay=0.5",
        "optim.backbone_lr_mult=0.1",
        "scheduler=none",
    )
    trainer = _fit(model, datamodule, tmp_path, epochs=1)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    names = ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    for i, name in enumerate(names):
        assert lrs[f"backbone.{i}.{name}"] == pytest.approx(0.1 * 0.1 * 0.5 ** (5 - i))
        assert lrs[f"backbone.{i}.{name}.no_decay"] == pytest.approx(0.1 * 0.1 * 0.5 ** (5 - i))
    assert lrs["head"] == pytest.approx(0.1)
    decays = {g["name"]: g["weight_decay"] for g in trainer.optimizers[0].param_groups}
    assert decays["head.no_decay"] == 0.0 and decays["head"] == pytest.approx(1e-4)


@pytest.mark.parametrize("scheduler", ["none", "cosine", "onecycle", "step", "plateau"])
def test_gradual_unfreezes_at_the_milestone_with_every_scheduler(tmp_path, scheduler):
    model, datamodule, before = _setup(
        tmp_path, "freeze=gradual", "freeze.milestones=[1,2]", "freeze.bn=train", f"scheduler={scheduler}"
    )
    recorder = Recorder()
    _fit(model, datamodule, tmp_path, epochs=3, callbacks=[recorder])
    states = recorder.states
    assert _changed_stages(model, before, states[0]) == set()  # head only
    assert _changed_stages(model, states[0], states[1]) == {4}  # layer4 from epoch 1
    assert _changed_stages(model, states[1], states[2]) == {0, 1, 2, 3, 4}  # everything from epoch 2
    if scheduler != "plateau":  # plateau keeps nominal LRs; the frozen groups get no gradient
        assert recorder.lrs[0]["backbone.4.layer4"] == 0.0 and recorder.lrs[1]["backbone.4.layer4"] > 0
        assert recorder.lrs[1]["backbone.0.conv1+bn1"] == 0.0 and recorder.lrs[2]["backbone.0.conv1+bn1"] > 0
    assert recorder.lrs[0]["head"] > 0


def test_resume_inside_a_gradual_schedule_restores_the_frozen_state(tmp_path):
    overrides = ("freeze=gradual", "freeze.milestones=[2]", "freeze.bn=train", "scheduler=cosine")
    model, datamodule, _ = _setup(tmp_path, *overrides)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(model, datamodule, tmp_path, epochs=1, callbacks=[checkpoint])  # stops after epoch 0
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    backbone_at_save = {
        k[len("backbone.") :]: v for k, v in saved["state_dict"].items() if k.startswith("backbone.")
    }

    resumed, datamodule, _ = _setup(tmp_path, *overrides)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)
    _fit(resumed, datamodule, tmp_path, 4, tmp_path / "ckpt" / "last.ckpt", callbacks=[recorder, checkpoint])
    assert sorted(recorder.states) == [1, 2, 3]
    assert _changed_stages(resumed, backbone_at_save, recorder.states[1]) == set()  # still frozen at epoch 1
    assert not any(recorder.requires_grad[1].values())
    assert _changed_stages(resumed, recorder.states[1], recorder.states[2]) == {0, 1, 2, 3, 4}
    assert all(recorder.requires_grad[2].values())
    assert recorder.lrs[1]["backbone.4.layer4"] == 0.0 < recorder.lrs[2]["backbone.4.layer4"]

    # resumed after the milestone: nothing is frozen again (Lightning #21901)
    after_milestone = tmp_path / "ckpt2" / "last.ckpt"
    again, datamodule, _ = _setup(tmp_path, *overrides)
    recorder = Recorder()
    _fit(again, datamodule, tmp_path, epochs=5, ckpt_path=after_milestone, callbacks=[recorder])
    assert sorted(recorder.states) == [4] and all(recorder.requires_grad[4].values())


def test_frozen_parameters_get_no_gradient(tmp_path):
    model, datamodule, _ = _setup(tmp_path, "freeze=partial", "freeze.trainable_blocks=1")
    images, targets = next(iter(datamodule.train_dataloader()))
    model.train()
    nn.functional.cross_entropy(model(images), targets).backward()
    for name, param in model.backbone.named_parameters():
        assert (param.grad is not None) == name.startswith("layer4"), name


def test_lr_finder_applies_and_records_its_suggestion(fast_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from transferlab.training import train

    run_dir = tmp_path / "run"
    train(fast_cfg("tune.lr_find=true", "tune.num_training=20", "trainer.limit_train_batches=20"))
    found = json.loads((run_dir / "lr_find.json").read_text())
    assert len(found["lr"]) == len(found["loss"]) >= 10 and found["lr"][0] < found["lr"][-1]
    assert (run_dir / "lr_find.png").stat().st_size > 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["optim"]["lr"] == pytest.approx(found["suggestion"])
    assert checkpoint["hyper_parameters"]["optim"]["lr"] != 0.01  # not the configured one
    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents*")).parent)).Reload()
    assert "tune/lr_find" in events.Tags()["images"]
    assert events.Scalars("tune/lr_suggestion")[0].value == pytest.approx(found["suggestion"])


def test_a_batch_norm_mode_changed_to_train_reaches_layers_put_in_eval():
    """freeze.bn=adapt from pretrained weights starts in eval (statistics kept until measured); the
    measured, or stored, `train` must put the layers back in training mode: Lightning restores each
    module's own mode and never calls train() on the model (a run from a checkpoint trained with frozen
    statistics before this was mended)."""
    hparams = {
        "backbone": {"source": "torchvision", "name": "resnet18", "weights": "DEFAULT"},
        "head": {"_target_": "transferlab.models.heads.LinearHead"},
        "num_classes": 2,
        "class_names": ["a", "b"],
        "optim": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
        "scheduler": {"name": "none"},
        "freeze": {"name": "full", "bn": "adapt"},
        "preprocessing": {"crop_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    model = ImageClassifier(**hparams)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in norms)  # adapt: eval until measured
    model.set_bn_mode("train")
    assert all(m.training for m in norms)
    model.set_bn_mode("eval")
    assert not any(m.training for m in norms)
