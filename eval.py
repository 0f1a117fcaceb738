"""Evaluate a checkpoint on a split: `python eval.py ckpt_path=outputs/runs/.../checkpoints/best.ckpt`.

Thin entry point: Hydra composes conf/eval.yaml; transferlab.evaluation does the work.
"""

import hydra
from omegaconf import DictConfig

import transferlab.rundir  # noqa: F401  (registers the run-directory resolver before Hydra composes)
from transferlab.errors import exit_on_user_error
from transferlab.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
