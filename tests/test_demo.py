"""The demo's whole loop runs (tiny settings) and writes its table; the table arithmetic is right."""

from __future__ import annotations

from tests.conftest import run_tool
from transferlab.config.schema import DEMO_METHODS
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
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ]
    overrides = "overrides=[" + ",".join(f"'{o}'" for o in tiny) + "]"  # quoted: they hold '='
    assert run_tool("demo", f"out={out}", "seeds=[42]", "shots=3", overrides) == 0
    report = (out / "results.md").read_text()
    for method in (
        "full fine-tune (`full`)",
        "linear probe (`linear_probe`)",
        "from scratch (random init) (`scratch`)",
    ):
        assert f"| {method} |" in report
    assert "3 labelled images per class" in report
    assert (out / "full_seed42" / "metrics.json").is_file()
    assert "Loaded backbone weights from" in (out / "full_seed42" / "train.log").read_text()
    assert "Loaded backbone weights from" not in capsys.readouterr().out  # the console shows the demo only
    capsys.readouterr()
    assert run_tool("demo", f"out={out}", overrides) != 0
    assert "already exists and is not empty" in capsys.readouterr().err


def test_demo_methods_are_the_schemas_choices():
    assert tuple(TARGET_METHODS) == DEMO_METHODS
