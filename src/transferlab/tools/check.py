"""Check data before training: `transferlab check data=imagefolder data.root=/data/skin` (conf/check.yaml).

Takes train.py's overrides, parses them as training would, scans and splits the data exactly as a
training run would, prints what is there and what is wrong, and exits with 1 when training would
stop, else 0.
"""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.tools.app import hydra_tool


def run(cfg: DictConfig) -> None:
    from transferlab.build import check_run_inputs
    from transferlab.config import parse_train_config
    from transferlab.data.check import check
    from transferlab.errors import USER_ERRORS

    try:
        config = parse_train_config(cfg)  # a bad key anywhere would stop training before the data is read
        check_run_inputs(config)
    except USER_ERRORS as err:
        print(f"Error: {err}")
        raise SystemExit(1) from None
    raise SystemExit(check(config.data, seed=config.seed))


main = hydra_tool("check")(run)

if __name__ == "__main__":
    main()
