"""Fine-tune a pretrained image classifier: `python train.py backbone=resnet50 optim=sgd`.

The same Hydra app as `transferlab train` (transferlab/tools/train.py, conf/train.yaml).
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("train")
