"""The evaluation job behind `eval.py`: test any checkpoint of ours on any split of any data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from transferlab.build import build_trainer, instantiate_group
from transferlab.checkpoints import check_checkpoint_classes, read_checkpoint
from transferlab.config import parse_eval_config, parse_group
from transferlab.config.schema import DataConfig
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.files import write_json
from transferlab.models.classifier import ImageClassifier
from transferlab.runtime import command_line_overrides

log = logging.getLogger(__name__)


def eval_data_config(checkpoint: dict[str, Any], overrides: dict[str, Any] | None) -> DataConfig:
    """The checkpoint's own data config, with the keys the user set (`data=...`, `data.root=...`) on top."""
    stored = (checkpoint.get("datamodule_hyper_parameters") or {}).get("data") or {}
    chosen = {key: value for key, value in (overrides or {}).items() if value is not None}
    merged = {**stored, **chosen}
    if "name" not in merged:
        raise ConfigError(
            "the checkpoint holds no data config: choose one, e.g. data=imagefolder data.root=..."
        )
    if chosen.get("name", stored.get("name")) != stored.get("name"):  # another dataset: its own keys only
        merged = chosen
    return parse_group("data", merged)


PREPROCESSING_KEYS = ("image_size", "mean", "std", "interpolation")


def eval_preprocessing(checkpoint: dict[str, Any], data: DataConfig, typed: list[str]) -> Preprocessing:
    """What the checkpoint was trained with; `data.image_size`, `mean`, `std`, `interpolation` typed
    for this evaluation replace it (e.g. to test at another resolution). A `data=<option>` preset's
    own values do not: they are not what the checkpoint was trained with, nor what was asked for."""
    stored = Preprocessing.from_dict(checkpoint["hyper_parameters"]["preprocessing"])
    keys = {o.split("=", 1)[0].lstrip("+~").removeprefix("data.") for o in typed}
    return stored.with_overrides(**{key: getattr(data, key) for key in PREPROCESSING_KEYS if key in keys})


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `ckpt_path` on `split`; writes metrics.json into the eval run directory and returns it."""
    config = parse_eval_config(cfg)
    checkpoint = read_checkpoint(config.ckpt_path, trust=config.trust_checkpoint)
    L.seed_everything(config.seed, workers=True)
    data = eval_data_config(checkpoint, config.data)
    preprocessing = eval_preprocessing(checkpoint, data, command_line_overrides())
    log.info("Preprocessing: %s", preprocessing)
    datamodule = TransferDataModule(data, preprocessing, seed=config.seed)
    datamodule.setup()
    check_checkpoint_classes(checkpoint, config.ckpt_path, datamodule.class_names)
    model = ImageClassifier.load_from_checkpoint(
        config.ckpt_path, map_location="cpu", weights_only=not config.trust_checkpoint
    )
    model.test_split = config.split
    trainer = build_trainer(config.trainer, callbacks=[], loggers=instantiate_group(config.logger))
    metrics: dict[str, Any] = {}
    for result in trainer.test(model, dataloaders=datamodule.split_dataloader(config.split)):
        metrics.update(result)
    metrics[f"{config.split}/confusion_matrix"] = model.test_confusion.tolist()
    metrics.update(
        {
            "ckpt_path": str(Path(config.ckpt_path).resolve()),
            "split": config.split,
            "class_names": datamodule.class_names,
            "preprocessing": preprocessing.to_dict(),
        }
    )
    if trainer.is_global_zero:
        write_json(Path(config.paths.output_dir) / "metrics.json", metrics)
        log.info("Wrote %s", Path(config.paths.output_dir) / "metrics.json")
    return metrics
