"""Check data before training: `transferlab check data=imagefolder data.root=/data/skin` (conf/check.yaml).

Takes train.py's overrides and runs a training run's checks, on the same functions and in the same
order: a sweep's settings given without -m, the config, the backbone and files, the callbacks and
Lightning's trainer arguments, the data (scanned and split
as training would; the report shows what is there and what is wrong), then the model for those
classes and input size with its pretrained weights. Exits with 1 when training would stop, else 0.
"""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from transferlab.build import (
        LIGHTNING_INFO,
        build_datamodule,
        build_trainer,
        check_run_inputs,
        instantiate_group,
    )
    from transferlab.config import parse_train_config
    from transferlab.data.check import check_data
    from transferlab.errors import USER_ERRORS
    from transferlab.launch import check_single_run
    from transferlab.runtime import is_multirun, quiet_loggers
    from transferlab.training import prepare_model

    try:  # the checks of a training run, in its order, on the same functions: the same verdicts
        if not is_multirun():  # a sweep's settings without -m (check -m checks each job's config)
            check_single_run(HydraConfig.get())
        config = parse_train_config(cfg)
        check_run_inputs(config)
        with quiet_loggers([LIGHTNING_INFO]):  # the devices it would use are not what check reports
            build_trainer(config.trainer, callbacks=instantiate_group(config.callbacks), loggers=[])
    except USER_ERRORS as err:
        print(f"Error: {err}")
        raise SystemExit(1) from None
    splits = check_data(config.data, seed=config.seed)
    if splits is None:
        raise SystemExit(1)
    datamodule = build_datamodule(config.data, config.backbone, config.seed, config.augment)
    datamodule.splits = splits  # read once, above
    try:  # the model for these classes and this input size, its pretrained weights, ckpt_path's classes
        prepare_model(config, datamodule)
    except USER_ERRORS as err:
        print(f"Training would stop:\n{err}")
        raise SystemExit(1) from None
    print("OK: training would start with this data.")
    raise SystemExit(0)


main = hydra_tool("check")(run)

if __name__ == "__main__":
    run_program(main)
