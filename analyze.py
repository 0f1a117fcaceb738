"""What a checkpoint gets wrong on a split: `python analyze.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt`.

The same Hydra app as `transferlab analyze` (transferlab/tools/analyze.py, conf/analyze.yaml): report/
with report.html in its run directory, and the pictures in TensorBoard.
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("analyze")
