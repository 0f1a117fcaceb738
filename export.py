"""Export a checkpoint: `python export.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt format=onnx`.

The same Hydra app as `transferlab export` (transferlab/tools/export.py, conf/export.yaml).
"""

from transferlab.tools.app import run_program
from transferlab.tools.export import main

if __name__ == "__main__":
    run_program(main)
