"""Table of a sweep: `transferlab summary sweep_dir=outputs/multirun/<sweep> [metric=val/acc] [out=DIR]`.

One row per job directory, best first by the sweep's optimized metric; writes summary.csv and
summary.md (conf/summary.yaml; the table itself is `sweep.summary`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.config.parse import build
    from transferlab.config.schema import SummaryConfig
    from transferlab.sweep.summary import write_summary

    config = build(SummaryConfig, OmegaConf.to_container(cfg, resolve=True), "", "summary.yaml")
    out = Path(config.out) if config.out else None
    print(write_summary(Path(config.sweep_dir), config.metric, out, config.mode), end="")


main = hydra_tool("summary")(run)

if __name__ == "__main__":
    run_program(main)
