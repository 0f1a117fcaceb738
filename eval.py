"""Evaluate a checkpoint on a split: `python eval.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt`.

The same Hydra app as `transferlab eval` (transferlab/tools/eval.py, conf/eval.yaml).
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("eval")
