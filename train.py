"""Fine-tune a pretrained image classifier: `python train.py backbone=resnet50 optim=sgd`.

Thin entry point: Hydra composes conf/train.yaml; transferlab.training does the work.
"""

import hydra
from omegaconf import DictConfig

import transferlab.rundir  # noqa: F401  (registers the run-directory resolver before Hydra composes)
from transferlab.errors import exit_on_user_error
from transferlab.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)  # what sweepers (e.g. Optuna) optimise


if __name__ == "__main__":
    main()
