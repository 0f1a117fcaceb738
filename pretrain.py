"""Pretrain a backbone on unlabelled images: `python pretrain.py method=autoencoder data=unlabeled data.root=...`.

The same Hydra app as `transferlab pretrain` (transferlab/tools/pretrain.py, conf/pretrain.yaml).
"""

from transferlab.tools import run_tool

if __name__ == "__main__":
    run_tool("pretrain")
