"""Fine-tune a pretrained image classifier: `transferlab train backbone=resnet50 optim=sgd` (conf/train.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> float | None:
    from transferlab.resume import resume_config
    from transferlab.runtime import command_line_overrides
    from transferlab.training import train

    if cfg.resume:  # continue that run: its saved config, its last.ckpt, its directory
        cfg = resume_config(cfg, command_line_overrides())
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)  # what sweepers (e.g. Optuna) optimise


main = hydra_tool("train")(run)

if __name__ == "__main__":
    run_program(main)
