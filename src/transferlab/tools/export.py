"""A deployable model: `transferlab export ckpt_path=.../best.ckpt format=onnx|torchscript`
(conf/export.yaml): model.onnx or model.pt, its model.json and parity.json in the run directory."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.inference.export import export

    export(cfg)


main = hydra_tool("export")(run)

if __name__ == "__main__":
    run_program(main)
