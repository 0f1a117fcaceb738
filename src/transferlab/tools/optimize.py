"""A smaller, faster model: `transferlab optimize ckpt_path=.../best.ckpt method=quantize`
(conf/optimize.yaml): model.onnx, model.int8.onnx, model.json and quantize.json in the run directory."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.compress.quantize import optimize

    optimize(cfg)


main = hydra_tool("optimize")(run)

if __name__ == "__main__":
    run_program(main)
