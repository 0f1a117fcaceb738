"""Predict new images: `python predict.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt inputs=DIR`.

The same Hydra app as `transferlab predict` (transferlab/tools/predict.py, conf/predict.yaml).
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("predict")
