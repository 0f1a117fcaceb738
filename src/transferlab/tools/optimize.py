"""A smaller, faster model: `transferlab optimize ckpt_path=.../best.ckpt method=quantize|prune`
(conf/optimize.yaml). quantize: model.onnx, model.int8.onnx, model.json and quantize.json in the run
directory; prune: pruned.ckpt, the recovery fine-tune's run in finetune/ and prune.json."""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from transferlab.config.parse import parse_tool_config
    from transferlab.config.schema import OptimizeConfig
    from transferlab.inference.export import refuse_preprocessing_keys

    config = parse_tool_config(cfg, OptimizeConfig, "optimize.yaml")
    refuse_preprocessing_keys("optimize")
    if config.method == "prune":
        from transferlab.compress.prune import prune_checkpoint

        prune_checkpoint(config)
    else:
        from transferlab.compress.quantize import quantize

        quantize(config)


main = hydra_tool("optimize")(run)

if __name__ == "__main__":
    run_program(main)
