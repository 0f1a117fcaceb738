"""What a checkpoint gets wrong on a split: `transferlab analyze ckpt_path=.../best.ckpt split=test`
(conf/analyze.yaml). Writes report/ (pictures, per_class.csv, summary.json, report.html) into its run
directory, and the pictures to TensorBoard."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.inference.analyze import analyze

    analyze(cfg)


main = hydra_tool("analyze")(run)

if __name__ == "__main__":
    run_program(main)
