"""Export a checkpoint: `python export.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt format=onnx`.

The same Hydra app as `transferlab export` (transferlab/tools/export.py, conf/export.yaml).
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("export")
