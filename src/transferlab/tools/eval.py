"""Evaluate a checkpoint on a split: `transferlab eval ckpt_path=.../best.ckpt split=test`, or an exported
or quantized model on its checkpoint's split: `transferlab eval model_path=.../model.int8.onnx` (conf/eval.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.evaluation import evaluate

    evaluate(cfg)


main = hydra_tool("eval")(run)

if __name__ == "__main__":
    run_program(main)
