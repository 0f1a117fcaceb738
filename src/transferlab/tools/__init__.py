"""Command-line tools, one module each: a Hydra app on `conf/<tool>.yaml` taking `key=value` overrides.

Run them as `transferlab <tool> key=value ...` (or `python -m transferlab.tools.<tool>`); `train.py`
and `eval.py` at the repository root are the same apps (`run_tool`). A new tool is a module here
defining `main` with `@hydra_tool("<tool>")`, and its `conf/<tool>.yaml`.

Start-up of a tool run as a program: its imports (torch, Lightning, Hydra, torchmetrics) create about
460,000 tracked objects that live as long as the process, and while they are made the garbage collector
walks all of them again and again: 0.6 s of full passes in a training run's 4 s start-up
(benchmarks/overhead.py, measured with gc.callbacks). A program therefore imports its tool with the
collector off, and `app.run_program` then freezes what the imports made (left out of later passes) and
turns it back on. This package stays free of heavy imports: it is imported before them.
"""

from __future__ import annotations

import gc
import importlib
import sys

# `python -m transferlab.tools.<tool>` (what the `transferlab` command runs, and Lightning's DDP children):
# Python imports this package while it locates the tool's module, and sys.argv[0] is then "-m" (as the
# Python docs say), so the tool's imports follow. Not so for a library import or a test process.
if sys.argv[:1] == ["-m"]:
    gc.disable()


def run_tool(name: str) -> None:
    """Run tool `name` as this program (the repository's train.py, eval.py, ...): its imports with the
    collector off, then `app.run_program`."""
    gc.disable()
    tool = importlib.import_module(f"transferlab.tools.{name}")
    from transferlab.tools.app import run_program

    run_program(tool.main)
