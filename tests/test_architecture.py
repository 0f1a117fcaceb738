"""What ARCHITECTURE.md promises: layers without cycles, nothing registered on import, configs in the
package, one tool style."""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SRC = ROOT / "src" / "transferlab"
# lowest first: a module may import its own layer or a lower one
LAYERS = {
    "facts": ("errors", "runtime", "files", "downloads"),
    "config": ("config",),
    "parts": ("backbones", "data", "models", "finetune"),
    "run": (
        "build",
        "training",
        "pretraining",
        "evaluation",
        "checkpoints",
        "resume",
        "launch",
        "callbacks",
        "sweep",
        "inference",
        "compress",
    ),
    "tools": ("tools", "__main__"),
}
RANK = {top: rank for rank, names in enumerate(LAYERS.values()) for top in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py") if "conf" not in p.relative_to(SRC).parts}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The transferlab modules `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferlab"):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules or {node.module}  # `from pkg import module` imports that module
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("transferlab")}
    return found


def test_no_import_cycles():
    graph = {
        # a package's __init__ runs before its modules anyway: an edge to one's own package is no cycle
        name: {m for m in imports(path, top_level_only=True) if m in MODULES and not name.startswith(m)}
        for name, path in MODULES.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in graph[name]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, dep]))
            if dep not in state:
                visit(dep, [*trail, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def layer(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_import_only_their_layer_or_lower(name):
    own = layer(name)
    if own is None:
        return  # transferlab/__init__.py
    higher = sorted(m for m in imports(MODULES[name], top_level_only=False) if (layer(m) or 0) > own)
    assert not higher, f"{name} (layer {own}) imports {higher}"


def test_every_module_belongs_to_a_layer():
    tops = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert tops <= set(RANK), tops - set(RANK)


def test_configs_ship_inside_the_package_and_each_tool_has_one():
    conf = importlib.resources.files("transferlab.conf")
    tools = sorted(p.stem for p in (SRC / "tools").glob("*.py") if p.stem not in ("__init__", "app"))
    assert {"train", "eval", "check", "summary", "demo"} <= set(tools)
    for tool in tools:
        assert (conf / f"{tool}.yaml").is_file(), tool
        assert callable(importlib.import_module(f"transferlab.tools.{tool}").main), tool
    assert (ROOT / "conf").resolve() == SRC / "conf"  # conf/ at the root is the package's


def test_no_module_is_imported_for_its_side_effects():
    for path in [*MODULES.values(), *ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]:
        for line in path.read_text().splitlines():
            assert not (
                line.startswith(("import transferlab", "from transferlab")) and "noqa: F401" in line
            ), f"{path}: {line}"


OPTIONAL_STACKS = ("timm", "safetensors", "optuna", "submitit", "matplotlib")


def test_optional_stacks_are_imported_only_where_used():
    """A run that does not use timm (or Optuna, submitit, plotting) never imports it: not at module level."""
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            heavy = [n for n in names if n.split(".")[0] in OPTIONAL_STACKS]
            assert not heavy, f"{name} imports {heavy} at module level"


PROGRAM_START = """
import gc, sys
passes = []
gc.callbacks.append(lambda phase, info: passes.append(info["generation"]) if phase == "stop" else None)
sys.argv = ["-m"]  # what Python sets while it locates the module of `python -m transferlab.tools.<tool>`
import transferlab.tools
light, before = "torch" not in sys.modules, len(passes)
import transferlab.tools.train
from transferlab.tools.app import run_program
seen = {}
run_program(lambda: seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count()))
print(light, len(passes) - before, seen["enabled"], seen["frozen"] > 100_000)
"""


def test_a_program_imports_its_tool_without_collector_passes_then_freezes_what_they_made():
    """The start-up of `python -m transferlab.tools.<tool>` (transferlab.tools' docstring): no garbage
    collection during the tool's imports, the collector back on and the imports' objects frozen when
    the tool runs; and transferlab.tools itself imports nothing heavy (it is imported first)."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM_START], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["True", "0", "True", "True"], done.stdout + done.stderr
