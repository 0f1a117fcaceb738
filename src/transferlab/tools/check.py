"""Check data before training: `transferlab check data=imagefolder data.root=/data/skin` (conf/check.yaml).

Takes train.py's overrides and runs a training run's checks, on the same functions and in the same
order: the config, the backbone and files, the callbacks and Lightning's trainer arguments, the data
(scanned and split as training would; the report shows what is there and what is wrong), then the model
for those classes and input size with its pretrained weights. Exits with 1 when training would stop,
else 0. With -m, each job of the sweep, here: a search (hparams_search) or a launcher is refused.
"""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool, run_program


def run(cfg: DictConfig) -> None:
    """Exits 0 when training would start, 1 when it would stop. Under -m each job of the sweep is
    checked; a job that would stop fails as a sweep job does (the sweep goes on, then exits 1)."""
    from transferlab.errors import ConfigError
    from transferlab.runtime import is_multirun

    would_start = check(cfg)
    if not is_multirun():
        raise SystemExit(0 if would_start else 1)
    if not would_start:
        raise ConfigError("training would stop with this job's settings (see above)")


def check(cfg: DictConfig) -> bool:
    """The report, printed; whether training would start."""
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
    from transferlab.launch import check_jobs_run_here, check_no_chdir
    from transferlab.runtime import quiet_loggers
    from transferlab.training import prepare_model

    try:  # the checks of a training run, in its order, on the same functions: the same verdicts
        hydra = HydraConfig.get()
        check_jobs_run_here(hydra)  # check's own rule for a search or a launcher, with -m or without
        check_no_chdir(hydra)
        config = parse_train_config(cfg)
        check_run_inputs(config)
        with quiet_loggers([LIGHTNING_INFO]):  # the devices it would use are not what check reports
            build_trainer(config.trainer, callbacks=instantiate_group(config.callbacks), loggers=[])
    except USER_ERRORS as err:
        print(f"Error: {err}")
        return False
    splits = check_data(config.data, seed=config.seed)
    if splits is None:
        return False
    datamodule = build_datamodule(config.data, config.backbone, config.seed, config.augment)
    datamodule.splits = splits  # read once, above
    try:  # the model for these classes and this input size, its pretrained weights, ckpt_path's classes
        prepare_model(config, datamodule)
    except USER_ERRORS as err:
        print(f"Training would stop:\n{err}")
        return False
    print("OK: training would start with this data.")
    return True


main = hydra_tool("check")(run)

if __name__ == "__main__":
    run_program(main)
