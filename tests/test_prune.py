"""Structured and unstructured pruning (compress.prune) and the pruned checkpoint's architecture record
(models.pruned). Tiny and in-process: random weights, 32 px images, no training."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import run_tool
from transferlab.compress.prune import prune_classifier, prune_unstructured, rebuild
from transferlab.errors import ConfigError
from transferlab.models.classifier import ImageClassifier

torch.manual_seed(0)
IMAGES = torch.randn(2, 3, 32, 32)


def classifier(name: str, source: str = "torchvision", head: str = "LinearHead") -> ImageClassifier:
    model = ImageClassifier(
        backbone={"source": source, "name": name, "weights": None, "trust_file": False},
        head={"_target_": f"transferlab.models.heads.{head}"},
        num_classes=3,
        class_names=["a", "b", "c"],
        optim={"_target_": "torch.optim.SGD", "lr": 0.01},
        scheduler={"name": "none"},
        freeze={"name": "full"},
        preprocessing={"crop_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    return model.eval()


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


def out_widths(model: nn.Module) -> dict[str, int]:
    """Each convolution's output channels, by module name."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.fixture(scope="module")
def pruned_resnet() -> tuple[ImageClassifier, object, dict[str, int]]:
    model = classifier("resnet18")
    widths = out_widths(model)
    return model, prune_classifier(model, IMAGES, amount=0.5), widths


def test_a_pruned_resnet_is_smaller_and_answers_in_the_same_shape(pruned_resnet):
    model, report, widths = pruned_resnet
    assert report.params_after < 0.35 * report.params_before and report.macs_after < 0.35 * report.macs_before
    assert outputs(model).shape == (2, 3)
    assert out_widths(model)["backbone.layer4.1.conv2"] == widths["backbone.layer4.1.conv2"] // 2
    assert model.head[-1].out_features == 3 and model.num_features == model.head[-1].in_features == 256
    assert model.hparams["pruned"] == report.pruned


def test_a_pruned_checkpoint_loads_like_any_other(pruned_resnet):
    model, _, _ = pruned_resnet
    buffer = io.BytesIO()  # what a checkpoint holds: plain hyperparameters and tensors
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    loaded = ImageClassifier(**checkpoint["hyper_parameters"])
    loaded.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(outputs(loaded), outputs(model))
    assert torch.equal(outputs(rebuild(model)), outputs(model))
    assert loaded.num_features == model.num_features
    other = {
        **checkpoint["hyper_parameters"],
        "backbone": {**model.hparams["backbone"], "name": "mobilenet_v3_small"},
    }
    with pytest.raises(ConfigError, match="pruned from another backbone"):
        ImageClassifier(**other)


def test_lightning_loads_a_pruned_checkpoint(pruned_resnet, tmp_path):
    import lightning

    model, _, _ = pruned_resnet
    path = tmp_path / "pruned.ckpt"
    torch.save(
        {
            "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict(),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    loaded = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert torch.equal(outputs(loaded), outputs(model))


def test_per_stage_amounts_prune_only_those_stages():
    model = classifier("resnet18")
    before = out_widths(model)
    prune_classifier(model, IMAGES, amount=0.5, per_stage={"layer3": 0.5})
    changed = {name for name, width in out_widths(model).items() if width != before[name]}
    assert changed and all(name.startswith("backbone.layer3.") for name in changed)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"amount": 1.0}, "prune.amount"),
        ({"amount": 0.0}, "prune.amount"),
        ({"amount": 0.5, "per_stage": {"layer9": 0.5}}, "prune.stages"),
        ({"amount": 0.5, "per_stage": {"layer3": 1.5}}, "prune.stages.layer3"),
        ({"amount": 0.5, "importance": "l7"}, "prune.importance"),
    ],
)
def test_bad_amounts_and_stages_are_refused_naming_the_key(kwargs, key):
    model = classifier("resnet18")
    with pytest.raises(ConfigError, match=key):
        prune_classifier(model, IMAGES, **kwargs)
    assert model.hparams.get("pruned") is None


def test_a_family_with_attention_is_refused_before_any_work(monkeypatch):
    import torch_pruning as tp

    monkeypatch.setattr(tp.pruner, "BasePruner", None)  # refused before the pruner is even built
    model = ImageClassifier(**{**classifier("resnet18").hparams, "backbone": vit_config()})
    with pytest.raises(ConfigError, match=r"vit_b_16.*ResNet, MobileNetV3, EfficientNet"):
        prune_classifier(model, torch.randn(1, 3, 224, 224), amount=0.5)


def vit_config() -> dict:
    return {"source": "torchvision", "name": "vit_b_16", "weights": None, "trust_file": False}


@pytest.mark.parametrize(
    ("name", "source", "head"),
    [("mobilenet_v3_small", "torchvision", "MLPHead"), ("efficientnet_lite0", "packaged", "LinearHead")],
)
def test_mobile_families_prune_and_reload(name, source, head):
    model = classifier(name, source, head)
    report = prune_classifier(model, IMAGES, amount=0.3)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    first = model.head[0] if head == "MLPHead" else model.head[-1]
    assert first.out_features == (256 if head == "MLPHead" else 3)  # the head keeps its own widths
    assert torch.equal(outputs(rebuild(model)), outputs(model))


def test_unstructured_pruning_reaches_the_sparsity_and_keeps_shapes():
    model = classifier("resnet18")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    sparsity = prune_unstructured(model, 0.6)
    assert sparsity == pytest.approx(0.6, abs=0.01)
    assert {name: p.shape for name, p in model.named_parameters()} == shapes
    assert not any(name.endswith("_orig") for name in model.state_dict())  # made permanent
    with pytest.raises(ConfigError, match="prune.amount"):
        prune_unstructured(model, 1.5)


# --- `transferlab optimize method=prune`: prune, save, recover, report ------------------------------------


@pytest.fixture(scope="module")
def pruned_run(trained_run, tmp_path_factory) -> Path:
    """conftest's trained ResNet-18 pruned by half and fine-tuned for one epoch: the optimize run dir."""
    out = tmp_path_factory.mktemp("pruned") / "run"
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    overrides = [f"ckpt_path={checkpoint}", "method=prune", "prune.amount=0.5", "finetune.epochs=1"]
    assert run_tool("optimize", *overrides, "latency_runs=1", f"hydra.run.dir={out}") == 0
    return out


def test_prune_job_reports_a_smaller_network_and_its_recovery(pruned_run):

    report = json.loads((pruned_run / "prune.json").read_text())
    assert report["params"]["after"] < 0.4 * report["params"]["before"]  # half the channels: ~1/4 the weights
    assert report["macs_per_image"]["after"] < 0.5 * report["macs_per_image"]["before"]
    assert report["split"] == "test" and report["images"] == 12
    for stage in ("before", "pruned", "recovered"):
        assert 0 <= report[stage]["test/acc"] <= 1
    assert report["recovered"]["epochs"] == 1 and Path(report["recovered"]["best_ckpt"]).is_file()
    assert set(report["pruned"]["latency_ms"]) == {"batch1", "batch32"}
    assert (
        report["pruned"]["bn_batches"] == 16
        and 0 <= report["pruned"]["test/acc_before_bn_recalibration"] <= 1
    )


def test_the_pruned_and_recovered_checkpoints_are_ordinary_ones(pruned_run, tmp_path):
    recovered = pruned_run / "finetune" / "checkpoints" / "best.ckpt"
    for path in (pruned_run / "pruned.ckpt", recovered):
        model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        assert model.hparams["pruned"] and sum(p.numel() for p in model.parameters()) < 4_000_000
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert run_tool("eval", f"ckpt_path={recovered}", "split=test", f"hydra.run.dir={tmp_path / 'eval'}") == 0
    assert run_tool("export", f"ckpt_path={recovered}", f"hydra.run.dir={tmp_path / 'export'}") == 0
    assert (tmp_path / "export" / "model.onnx").is_file()  # passed export's parity check


def test_prune_without_its_run_config_says_how_to_prune_only(trained_run, tmp_path, capsys):

    moved = tmp_path / "elsewhere" / "best.ckpt"
    moved.parent.mkdir()
    shutil.copy(trained_run / "checkpoints" / "best.ckpt", moved)
    status = run_tool("optimize", f"ckpt_path={moved}", "method=prune", f"hydra.run.dir={tmp_path / 'r'}")
    assert status != 0 and "set finetune.epochs=0 to prune only" in "".join(capsys.readouterr())
    for amount in ("0.3", "0.5"):  # 0.5 is the default: typed, so refused too
        status = run_tool(
            "optimize",
            f"ckpt_path={moved}",
            "method=quantize",
            f"prune.amount={amount}",
            f"hydra.run.dir={tmp_path / amount}",
        )
        assert status != 0 and "prune.* is read only with method=prune" in "".join(capsys.readouterr())


def test_batch_norm_recalibration_estimates_the_statistics_anew():
    from transferlab.compress.prune import recalibrate_batch_norm

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    images = [torch.randn(8, 3, 4, 4) * 3 + 5 for _ in range(3)]
    recalibrate_batch_norm(net, images)
    with torch.no_grad():
        expected = torch.cat([net[0](x) for x in images]).transpose(0, 1).reshape(4, -1).mean(dim=1)
    torch.testing.assert_close(net[1].running_mean, expected, rtol=1e-4, atol=1e-4)
    assert net[1].momentum == 0.1 and not net.training


def test_init_from_is_one_way_to_start_and_needs_the_same_backbone(pruned_run, tmp_path, capsys):
    from tests.conftest import FAST, compose_config
    from transferlab.config import parse_train_config

    with pytest.raises(ConfigError, match="init_from starts a new run from a checkpoint's network"):
        parse_train_config(compose_config([*FAST, "init_from=a.ckpt", "ckpt_path=b.ckpt"], tmp_path))
    data = json.loads((pruned_run / "prune.json").read_text())["pruned"]["file"]
    status = run_tool(
        "train", *FAST, "backbone=mobilenet_v3_large", f"init_from={data}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert status != 0 and "use the same backbone" in "".join(capsys.readouterr())


def _run_with_moved_data(trained_run: Path, root: Path) -> tuple[Path, Path]:
    """A copy of trained_run whose checkpoint and run config name a data folder that is gone (the data
    moved to `root`): (its best.ckpt, root)."""
    run = root / "run"
    shutil.copytree(trained_run / ".hydra", run / ".hydra")
    (run / "checkpoints").mkdir()
    checkpoint = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    old_root = str(root / "gone")
    checkpoint["datamodule_hyper_parameters"]["data"]["root"] = old_root
    torch.save(checkpoint, run / "checkpoints" / "best.ckpt")
    config = (run / ".hydra" / "config.yaml").read_text()
    (run / ".hydra" / "config.yaml").write_text(config.replace(str(trained_run.parent / "data"), old_root))
    shutil.copytree(trained_run.parent / "data", root / "moved")
    return run / "checkpoints" / "best.ckpt", root / "moved"


def test_the_recovery_trains_on_the_data_keys_given_to_optimize(trained_run, tmp_path):
    """data.root=... (the data moved) is measured on and fine-tuned on: the recovery is a training run of
    its own, from the saved run config, which still names the old folder."""
    checkpoint, moved = _run_with_moved_data(trained_run, tmp_path)
    out = tmp_path / "pruned"
    overrides = ["method=prune", "prune.amount=0.3", "finetune.epochs=1", "latency_runs=1"]
    status = run_tool(
        "optimize", f"ckpt_path={checkpoint}", f"data.root={moved}", *overrides, f"hydra.run.dir={out}"
    )
    assert status == 0, (out / "error.txt").read_text()[-2000:] if (out / "error.txt").exists() else status
    report = json.loads((out / "prune.json").read_text())
    assert Path(report["recovered"]["best_ckpt"]).is_file() and report["recovered"]["test/acc"] is not None
    stored = torch.load(report["recovered"]["best_ckpt"], weights_only=True)["datamodule_hyper_parameters"]
    assert stored["data"]["root"] == str(moved)


def test_a_bad_stage_or_recovery_config_is_refused_before_any_work(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    status = run_tool(
        "optimize", f"ckpt_path={checkpoint}", "method=prune", "prune.stages={nope: 0.5}",
        "finetune.epochs=0", f"hydra.run.dir={tmp_path / 's'}",
    )  # fmt: skip
    err = "".join(capsys.readouterr())
    assert status == 2 and "prune.stages names 'nope'" in err and "Preprocessing" not in err
    run = tmp_path / "run"
    shutil.copytree(trained_run / ".hydra", run / ".hydra")
    (run / "checkpoints").mkdir()
    shutil.copy(checkpoint, run / "checkpoints" / "best.ckpt")
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("  lr: 0.01\n", "  lr: -1\n"))  # optim.lr
    status = run_tool(
        "optimize", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "method=prune", "finetune.epochs=1",
        f"hydra.run.dir={tmp_path / 'c'}",
    )  # fmt: skip
    err = "".join(capsys.readouterr())
    assert status == 2 and "as the recovery fine-tune's config" in err and "Preprocessing" not in err


def test_the_recovery_runs_in_one_process():
    from omegaconf import OmegaConf

    from transferlab.compress.prune import _one_process

    trainer = OmegaConf.create({"devices": 4, "num_nodes": 2, "strategy": "ddp", "accelerator": "gpu"})
    _one_process(trainer)
    assert (trainer.devices, trainer.num_nodes, trainer.strategy) == (1, 1, "auto")


def test_calibration_needs_training_images():
    from types import SimpleNamespace

    from transferlab.errors import DataError
    from transferlab.evaluation import calibration_batches

    empty = SimpleNamespace(split_dataloader=lambda split: SimpleNamespace(dataset=[]), batch_size=4)
    with pytest.raises(
        DataError, match=r"prune.bn_batches=16 reads training images, and the training split has none"
    ):
        calibration_batches(empty, 16, 0, "prune.bn_batches")


def test_the_recovery_run_resumes_like_any_run(trained_run, tmp_path):
    """finetune/ keeps its config where train.py keeps a run's: `resume=` continues it (the pruned widths
    come from its last.ckpt), and optimize can prune the recovered checkpoint again."""
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "pruned"
    overrides = [
        "method=prune",
        "prune.amount=0.3",
        "finetune.epochs=1",
        "latency_runs=1",
        f"hydra.run.dir={out}",
    ]
    assert run_tool("optimize", f"ckpt_path={checkpoint}", *overrides) == 0
    recovery = out / "finetune"
    assert run_tool("train", f"resume={recovery}", "trainer.max_epochs=2") == 0
    assert json.loads((recovery / "metrics.json").read_text())["epochs_trained"] == 2
    model = ImageClassifier.load_from_checkpoint(recovery / "checkpoints" / "last.ckpt", weights_only=True)
    assert model.hparams["pruned"]
