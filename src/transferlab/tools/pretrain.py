"""Pretrain a backbone on unlabelled images: `transferlab pretrain method=autoencoder data=unlabeled
data.root=...` (conf/pretrain.yaml); then `train.py backbone.weights=<its checkpoint>`."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> float | None:
    from transferlab.pretraining import pretrain
    from transferlab.resume import resume_config
    from transferlab.runtime import command_line_overrides

    if cfg.resume:  # continue that run: its saved config, its last.ckpt, its directory
        cfg = resume_config(cfg, command_line_overrides())
    return pretrain(cfg).get("val/loss")  # what sweepers minimise


main = hydra_tool("pretrain")(run)

if __name__ == "__main__":
    run_program(main)
