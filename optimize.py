"""Optimize a checkpoint: `python optimize.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt method=quantize`.

The same Hydra app as `transferlab optimize` (transferlab/tools/optimize.py, conf/optimize.yaml).
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("optimize")
