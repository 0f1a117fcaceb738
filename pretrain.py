"""Pretrain a backbone on unlabelled images: `python pretrain.py method=autoencoder data=unlabeled data.root=...`.

The same Hydra app as `transferlab pretrain` (transferlab/tools/pretrain.py, conf/pretrain.yaml).
"""

from transferlab.tools.app import run_program
from transferlab.tools.pretrain import main

if __name__ == "__main__":
    run_program(main)
