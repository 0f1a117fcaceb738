"""The evaluation job behind `eval.py`: test any checkpoint of ours on any split of any data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from transferlab.config import to_plain, validate_data
from transferlab.data.datamodule import SPLITS, TransferDataModule
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.models.checkpoints import check_checkpoint_classes, read_checkpoint
from transferlab.models.classifier import ImageClassifier
from transferlab.rundir import write_json
from transferlab.training import instantiate_group

log = logging.getLogger(__name__)


def eval_data_config(checkpoint: dict[str, Any], overrides: DictConfig | None) -> DictConfig:
    """The checkpoint's own data config, with the user's `data=...` choices (those not null) on top."""
    stored = (checkpoint.get("datamodule_hyper_parameters") or {}).get("data") or {}
    chosen = {k: v for k, v in (to_plain(overrides) or {}).items() if v is not None}
    merged = OmegaConf.merge(OmegaConf.create(stored), OmegaConf.create(chosen))
    if "name" not in merged:
        raise ConfigError(
            "the checkpoint holds no data config: choose one, e.g. data=imagefolder data.root=..."
        )
    validate_data(merged)
    return merged


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `ckpt_path` on `split`; writes metrics.json into the eval run directory and returns it."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    trust = bool(cfg.get("trust_checkpoint", False))
    checkpoint = read_checkpoint(cfg.ckpt_path, trust=trust)
    L.seed_everything(cfg.seed, workers=True)
    hparams = checkpoint["hyper_parameters"]
    data_cfg = eval_data_config(checkpoint, cfg.get("data"))
    datamodule = TransferDataModule(
        to_plain(data_cfg), Preprocessing.from_dict(hparams["preprocessing"]), seed=cfg.seed
    )
    datamodule.setup()
    check_checkpoint_classes(checkpoint, cfg.ckpt_path, datamodule.class_names)
    model = ImageClassifier.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=not trust)
    model.test_split = cfg.split
    trainer = instantiate(
        cfg.trainer, logger=instantiate_group(cfg.get("logger")) or False, enable_progress_bar=False
    )
    metrics: dict[str, Any] = {}
    for result in trainer.test(model, dataloaders=datamodule.split_dataloader(cfg.split)):
        metrics.update(result)
    metrics[f"{cfg.split}/confusion_matrix"] = model.test_confusion.tolist()
    metrics.update(
        {
            "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
            "split": cfg.split,
            "class_names": datamodule.class_names,
        }
    )
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log.info("Wrote %s", Path(cfg.paths.output_dir) / "metrics.json")
    return metrics
