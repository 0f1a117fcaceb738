"""The demo's whole loop runs (tiny settings) and writes its table; the table arithmetic is right."""

from __future__ import annotations

from tests.conftest import run_tool
from transferlab.config.schema import DEMO_METHODS, DemoConfig
from transferlab.tools.demo import TARGET_METHODS, summarise


def test_summary_table_mean_and_spread():
    runs = {
        "a": [
            {"test/acc": 0.5, "test/f1": 0.4, "val/acc": 0.6},
            {"test/acc": 0.7, "test/f1": 0.6, "val/acc": 0.8},
        ]
    }
    table = summarise(runs)
    assert "| a | 0.600 ± 0.141 | 0.500 ± 0.141 | 0.700 ± 0.141 | 0.500 0.700 |" in table


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = [
        "data.image_size=16",
        "data.min_batches_per_epoch=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ]
    overrides = "overrides=[" + ",".join(f"'{o}'" for o in tiny) + "]"  # quoted: they hold '='
    # ImageNet weights and the digits 0-4 source run (the probe and scratch differ only in overrides)
    methods = ["imagenet_finetune", "digits_pretrained"]
    assert (
        run_tool("demo", f"out={out}", "seeds=[42]", "shots=3", f"methods=[{','.join(methods)}]", overrides)
        == 0
    )
    report = (out / "results.md").read_text()
    for slug in methods:
        assert f"| {TARGET_METHODS[slug][0]} (`{slug}`) |" in report
    assert "3 labelled images per class" in report
    assert "Related task: ResNet-18 from scratch on digits 0-4" in report
    finetune_log = (out / "imagenet_finetune_seed42" / "train.log").read_text()
    assert "Loaded backbone weights from packaged:efficientnet_lite0:DEFAULT" in finetune_log
    assert "Loaded backbone weights from" in (out / "digits_pretrained_seed42" / "train.log").read_text()
    assert "Loaded backbone weights from" not in capsys.readouterr().out  # the console shows the demo only
    capsys.readouterr()
    assert run_tool("demo", f"out={out}", overrides) != 0
    assert "already exists and is not empty" in capsys.readouterr().err


def test_demo_methods_are_the_schemas_choices():
    assert tuple(TARGET_METHODS) == DEMO_METHODS
    # make demo: ImageNet transfer three ways, and the related-task ResNet-18
    assert DemoConfig().methods == [
        "imagenet_finetune",
        "imagenet_linear_probe",
        "imagenet_scratch",
        "digits_pretrained",
    ]


def test_no_methods_or_a_repeated_seed_is_refused_before_any_run():
    import pytest

    from transferlab.errors import ConfigError

    with pytest.raises(ConfigError, match="methods must list at least one of: imagenet_finetune"):
        DemoConfig(methods=[])
    with pytest.raises(ConfigError, match="seeds lists 1 twice"):
        DemoConfig(seeds=[1, 2, 1])
    with pytest.raises(ConfigError, match="methods lists imagenet_scratch twice"):
        DemoConfig(methods=["imagenet_scratch", "imagenet_scratch"])
