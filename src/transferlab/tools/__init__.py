"""Command-line tools, one module each: a Hydra app on `conf/<tool>.yaml` taking `key=value` overrides.

Run them as `transferlab <tool> key=value ...` (or `python -m transferlab.tools.<tool>`); `train.py`
and `eval.py` at the repository root are the same apps. A new tool is a module here defining `main`
with `@hydra_tool("<tool>")`, and its `conf/<tool>.yaml`.
"""
