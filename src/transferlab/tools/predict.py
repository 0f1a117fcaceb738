"""Class probabilities for new images: `transferlab predict ckpt_path=.../best.ckpt inputs=DIR`
(or model_path=<exported model>; conf/predict.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.inference.predict import predict

    predict(cfg)


main = hydra_tool("predict")(run)

if __name__ == "__main__":
    run_program(main)
