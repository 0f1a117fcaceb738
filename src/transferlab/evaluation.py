"""The evaluation job behind `eval.py`: test any checkpoint of ours on any split of any data.

Which images a split holds is decided here, so that a checkpoint is never tested on images it was
trained on. On its own image folder (the run's data.root), the split is the run's stored list
(<run>/splits/<split>.txt, next to <run>/checkpoints/): a folder that changed since training would
split differently. Files of the list that are gone are reported (missing_files.txt in the eval
directory) and stop the evaluation unless data.skip_bad=true: metrics on part of a split are not
the split's. Where the lists cannot be found (a copied checkpoint), the folder is split again and
used only if the split is provably the run's: its fingerprint equals the one the checkpoint keeps.
Digits and CIFAR-10 splits are fixed by their seeds (checked against the fingerprint too). Other data
(another data.root or dataset) has no run split: its own split is used, and the log says so.

An exported model (model_path=: ONNX, int8 ONNX, TorchScript) is tested on the split its source
checkpoint (named with its sha256 in model.json) would be, chosen by the same code from that checkpoint,
with the card's preprocessing; its metrics are the test step's torchmetrics and loss (`SplitScorer`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import MeanMetric

from transferlab.build import build_trainer, instantiate_group
from transferlab.checkpoints import check_checkpoint_classes, checkpoint_run_dir, read_checkpoint
from transferlab.config import parse_eval_config, parse_group
from transferlab.config.schema import SPLITS, DataConfig, EvalConfig
from transferlab.data.datamodule import TransferDataModule
from transferlab.data.datasets import (
    DataSplits,
    Split,
    StoredSplit,
    classes_without_images,
    fingerprint,
    read_split_file,
    stored_split,
)
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError, DataError
from transferlab.files import write_json
from transferlab.inference.model import CARD_NAME, ModelCard, file_sha256
from transferlab.inference.predictors import open_exported, resolve_device
from transferlab.models.classifier import ImageClassifier
from transferlab.models.losses import loss_from_hyperparameters
from transferlab.models.metrics import classification_metrics, per_class_metrics
from transferlab.runtime import command_line_overrides, override_key

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
# the loss, the sampler, augmentation, the training loader's passes per epoch
TRAINING_ONLY_KEYS = ("imbalance", "allow_hflip", "min_crop_scale", "min_batches_per_epoch")


def eval_preprocessing(checkpoint: dict[str, Any], data: DataConfig, typed: list[str]) -> Preprocessing:
    """What the checkpoint was trained with; `data.image_size`, `mean`, `std`, `interpolation` typed
    for this evaluation replace it (e.g. to test at another resolution). A `data=<option>` preset's
    own values do not: they are not what the checkpoint was trained with, nor what was asked for."""
    stored = Preprocessing.from_dict(checkpoint["hyper_parameters"]["preprocessing"])
    keys = typed_data_keys(typed)
    return stored.with_overrides(**{key: getattr(data, key) for key in PREPROCESSING_KEYS if key in keys})


def typed_data_keys(typed: list[str]) -> set[str]:
    """The data keys among the overrides typed for this evaluation: `data.split_seed=1` -> split_seed."""
    keys = map(override_key, typed)
    return {key.removeprefix("data.") for key in keys if key.startswith("data.")}


@dataclass
class CheckpointData:
    """A checkpoint's split, as eval, export's parity check and analyze read it."""

    datamodule: TransferDataModule  # set up, its classes checked against the checkpoint's
    preprocessing: Preprocessing
    source: dict[str, Any]  # where the split's images come from (metrics.json's "split_source")


def checkpoint_data(
    checkpoint: dict[str, Any],
    ckpt_path: str,
    data_overrides: dict[str, Any] | None,
    split: str,
    seed: int,
    output_dir: Path,
    preprocessing: Preprocessing | None = None,
) -> CheckpointData:
    """The checkpoint's own data (with the `data.*` keys typed on top) and its `split`, never images the
    checkpoint was trained on (see the module's docstring). `preprocessing`: an exported model's (its
    card's), instead of the checkpoint's with the typed keys (`eval_preprocessing`)."""
    typed = command_line_overrides()
    for key in sorted(typed_data_keys(typed) & set(TRAINING_ONLY_KEYS)):
        raise ConfigError(f"data.{key} is not read here: it shapes training only. Remove it")
    data = keep_runs_split_keys(checkpoint, eval_data_config(checkpoint, data_overrides), typed)
    if preprocessing is None:
        preprocessing = eval_preprocessing(checkpoint, data, typed)
    log.info("Preprocessing: %s", preprocessing)
    chosen = choose_split(checkpoint, ckpt_path, data, split, output_dir)
    datamodule = TransferDataModule(data, preprocessing, seed=seed, splits=chosen.splits)
    datamodule.setup()
    check_checkpoint_classes(checkpoint, ckpt_path, datamodule.class_names)
    if chosen.needs_proof:
        chosen.source.update(check_remade_split(checkpoint, ckpt_path, datamodule, split))
    return CheckpointData(datamodule, preprocessing, chosen.source)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `ckpt_path` (or `model_path`, an exported model) on `split`; writes metrics.json into the eval
    run directory and returns it."""
    config = parse_eval_config(cfg)
    if config.model_path is not None:
        return evaluate_exported(config)
    return evaluate_checkpoint(config)


def evaluate_checkpoint(config: EvalConfig) -> dict[str, Any]:
    """`ckpt_path` tested by Lightning's test loop: the model's own test step and torchmetrics."""
    assert config.ckpt_path is not None  # EvalConfig: one of ckpt_path, model_path
    checkpoint = read_checkpoint(config.ckpt_path, trust=config.trust_checkpoint)
    L.seed_everything(config.seed, workers=True)
    output_dir = Path(config.paths.output_dir)
    data = checkpoint_data(checkpoint, config.ckpt_path, config.data, config.split, config.seed, output_dir)
    datamodule = data.datamodule
    model = ImageClassifier.load_from_checkpoint(
        config.ckpt_path, map_location="cpu", weights_only=not config.trust_checkpoint
    )
    model.test_split = config.split
    trainer = build_trainer(config.trainer, callbacks=[], loggers=instantiate_group(config.logger))
    metrics: dict[str, Any] = {}
    for result in trainer.test(model, dataloaders=datamodule.split_dataloader(config.split)):
        metrics.update(result)
    metrics[f"{config.split}/confusion_matrix"] = model.test_confusion.tolist()
    evaluated = {"model_path": None, "model_format": "checkpoint", "quantization": None}
    described = describe_eval(metrics, config, config.ckpt_path, evaluated, data)
    if trainer.is_global_zero:
        write_metrics(described, config.split, output_dir, data)
    return described


def describe_eval(
    metrics: dict[str, Any],
    config: EvalConfig,
    ckpt_path: str | Path,
    evaluated: dict[str, Any],
    data: CheckpointData,
) -> dict[str, Any]:
    """The metrics with what was evaluated on what: the keys of metrics.json beside the metrics, the same
    for a checkpoint and an exported model (`evaluated`: model_path, model_format, quantization)."""
    return {
        **metrics,
        "ckpt_path": str(Path(ckpt_path).expanduser().resolve()),
        **evaluated,
        "split": config.split,
        "split_source": data.source,
        "class_names": data.datamodule.class_names,
        "preprocessing": data.preprocessing.to_dict(),
    }


def write_metrics(described: dict[str, Any], split: str, output_dir: Path, data: CheckpointData) -> None:
    """metrics.json (`describe_eval`'s) and the list of the images evaluated, in the eval directory."""
    write_evaluated_list(data.datamodule, split, output_dir)
    write_json(output_dir / "metrics.json", described)
    log.info("Wrote %s", output_dir / "metrics.json")


# --- an exported model (model_path=) -------------------------------------------------------------------

# trainer.accelerator -> the device a TorchScript model runs on (ONNX models run on the CPU)
ACCELERATOR_DEVICES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}


def evaluate_exported(config: EvalConfig) -> dict[str, Any]:
    """`model_path` (ONNX, int8 ONNX or TorchScript, with its model.json) on the split its source
    checkpoint would be tested on (`checkpoint_data`: the same code path), with its card's preprocessing,
    scored by `SplitScorer`: the torchmetrics and loss of the checkpoint's test step."""
    assert config.model_path is not None  # EvalConfig: one of ckpt_path, model_path
    # export's own refusal: the model takes the preprocessing its card records (imported here: export
    # imports this module)
    from transferlab.inference.export import refuse_preprocessing_keys

    refuse_preprocessing_keys(f"eval with model_path={config.model_path}")
    accelerator = str((config.trainer or {}).get("accelerator", "auto"))
    # checked here, named as eval's own key (open_exported's check would name predict's device=)
    device = resolve_device(
        ACCELERATOR_DEVICES.get(accelerator, "auto"), f"trainer.accelerator={accelerator}"
    )
    model = open_exported(config.model_path, device=device.type)
    ckpt_path = source_checkpoint(model.card, config.model_path)
    checkpoint = read_checkpoint(ckpt_path, trust=config.trust_checkpoint)
    L.seed_everything(config.seed, workers=True)
    output_dir = Path(config.paths.output_dir)
    data = checkpoint_data(
        checkpoint, str(ckpt_path), config.data, config.split, config.seed, output_dir, model.card.prep
    )
    class_names = data.datamodule.class_names
    scorer = SplitScorer(
        len(class_names),
        config.split,
        loss_from_hyperparameters(checkpoint["hyper_parameters"].get("loss")),
        class_names,
    )
    del checkpoint
    for images, targets in data.datamodule.split_dataloader(config.split):
        # the exported model divides its logits by the checkpoint's temperature; the test step's loss
        # is of the logits before that (accuracy and F1 are the same either way)
        scorer.update(model(images.float().contiguous()) * model.card.temperature, targets)
    scores = scorer.scores()
    log.info("%s: %s", config.model_path, ", ".join(f"{key} {value:.4f}" for key, value in scores.items()))
    metrics = {**scores, f"{config.split}/confusion_matrix": scorer.confusion_matrix()}
    evaluated = {
        "model_path": str(Path(config.model_path).expanduser().resolve()),
        "model_format": model.card.format,
        "quantization": quantization_of(model.card, config.model_path),
    }
    described = describe_eval(metrics, config, ckpt_path, evaluated, data)
    write_metrics(described, config.split, output_dir, data)
    return described


def source_checkpoint(card: ModelCard, model_path: str) -> Path:
    """The checkpoint the model was exported from (model.json's source_checkpoint): its data config and
    run split say which images the model is tested on. It must be there, and be the file exported."""
    card_file = Path(model_path).expanduser().parent / CARD_NAME
    recorded = card.source_checkpoint or {}
    if not recorded.get("path") or not recorded.get("sha256"):
        raise ConfigError(
            f"{card_file} names no source checkpoint (source_checkpoint.path and .sha256): eval cannot "
            "tell which data and split the model is to be tested on. Export it again with `transferlab export`"
        )
    source = Path(recorded["path"])
    if not source.is_file():
        raise ConfigError(
            f"model_path={model_path}: the checkpoint it was exported from, {source} (source_checkpoint in "
            f"{card_file}), is not there: eval reads the data config (data=, data.root=) and the run's split "
            "from it, and without it cannot keep training images out of the split. Put the checkpoint back "
            "there (a link to it will do; its run's splits/ folder beside checkpoints/ too)"
        )
    if file_sha256(source) != recorded["sha256"]:
        raise ConfigError(
            f"model_path={model_path} was not exported from {source}: the file's sha256 is not the one in "
            f"{card_file} (the checkpoint was replaced since, e.g. by another run into its directory). Put "
            "back the checkpoint it was exported from, or export again from this one"
        )
    return source


def quantization_of(card: ModelCard, model_path: str) -> dict[str, Any] | None:
    """An int8 model's scheme; None for fp32 models, the fp32 model.onnx a quantize run keeps beside its
    int8 file included (the card there describes the int8 file)."""
    quantization = card.quantization
    if quantization is None or Path(model_path).name == quantization.get("fp32_file"):
        return None
    return quantization.get("scheme")


class SplitScorer:
    """One model's metrics on a split, named as metrics.json names them (`<split>/acc`, ...): the
    torchmetrics of the test step (`classification_metrics`); with `criterion`, `<split>/loss` (the test
    step's sample-weighted mean); with `class_names`, `<split>/acc_class/<name>` and the confusion matrix.
    For models run outside Lightning: eval model_path=, quantize's fp32/int8 comparison."""

    def __init__(
        self,
        num_classes: int,
        split: str,
        criterion: nn.Module | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        # each metric on its own, not as the MetricCollection: its compute groups, formed on the first
        # batch, merge top-5 accuracy with precision/recall/F1 when that batch is one class predicted
        # right (a split in class order), and those then report top-5 numbers
        self.metrics = dict(classification_metrics(num_classes).items())
        self.detail = per_class_metrics(num_classes)
        self.loss = MeanMetric()
        self.split, self.criterion, self.class_names = split, criterion, class_names

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        for metric in self.metrics.values():
            metric.update(logits, targets)
        if self.class_names is not None:
            self.detail.update(logits, targets)
        if self.criterion is not None:
            self.loss.update(self.criterion(logits, targets), weight=len(targets))

    def scores(self) -> dict[str, float]:
        split = self.split
        scores = {f"{split}/{key}": float(metric.compute()) for key, metric in self.metrics.items()}
        if self.criterion is not None:
            scores[f"{split}/loss"] = float(self.loss.compute())
        if self.class_names is not None:
            per_class = self.detail["acc_class"].compute()
            scores.update(
                {f"{split}/acc_class/{n}": float(v) for n, v in zip(self.class_names, per_class, strict=True)}
            )
        return scores

    def confusion_matrix(self) -> list[list[int]]:
        return self.detail["confusion_matrix"].compute().tolist()


# --- which images the evaluated split holds ------------------------------------------------------------

# Keys that decide which images fall into val and test: another value on the run's own data would
# re-split it and put images the checkpoint was trained on into the evaluated split.
SPLIT_KEYS = ("split_seed", "val_fraction", "test_fraction")
# Keys a run's stored lists already applied (image folders): another value cannot be honoured.
LIST_KEYS = ("classes", "shots", "shots_seed", "class_fraction", "empty_classes")
_PATHS_SHOWN = 5  # missing files named in the message; missing_files.txt lists them all


@dataclass
class ChosenSplit:
    """The evaluated split's images and where they come from."""

    splits: DataSplits | None  # made here from the run's lists; None: the data module makes them
    source: dict[str, Any]  # metrics.json's "split_source"
    needs_proof: bool = False  # made again from the config: its fingerprint must be the run's


def stored_data(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The data config the checkpoint's run trained with (plain data; empty if it has none)."""
    return (checkpoint.get("datamodule_hyper_parameters") or {}).get("data") or {}


def stored_fingerprints(checkpoint: dict[str, Any]) -> dict[str, str]:
    """Each split's fingerprint, kept by `TransferDataModule.state_dict` (none in older checkpoints)."""
    return (checkpoint.get(TransferDataModule.__qualname__) or {}).get("split_fingerprints") or {}


def run_splits_dir(ckpt_path: str | Path) -> Path:
    """Where the checkpoint's run keeps its split lists: <run>/checkpoints/x.ckpt -> <run>/splits."""
    return checkpoint_run_dir(ckpt_path) / "splits"


def _same_folder(a: str | None, b: str | None) -> bool:
    return bool(a and b) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def is_runs_data(stored: dict[str, Any], data: DataConfig) -> bool:
    """The data the checkpoint was trained on: its dataset, and for image folders its data.root."""
    if stored.get("name") != data.name:
        return False
    return data.name != "imagefolder" or _same_folder(stored.get("root"), data.root)


def choose_split(
    checkpoint: dict[str, Any], ckpt_path: str, data: DataConfig, split: str, output_dir: Path
) -> ChosenSplit:
    """The run's own split where the data is the run's (see the module's docstring), else the data's own."""
    stored = stored_data(checkpoint)
    if not is_runs_data(stored, data):
        return _other_data(stored, data, split)
    if data.name != "imagefolder":
        return _seeded_split(checkpoint, data, split)
    lists = run_splits_dir(ckpt_path)
    if (lists / f"{split}.txt").is_file():
        return _run_list(checkpoint, data, split, lists / f"{split}.txt", output_dir)
    if (lists / "summary.json").is_file():
        made = sorted(p.stem for p in lists.glob("*.txt"))
        raise ConfigError(
            f"the checkpoint's run had no {split} split ({lists} lists {', '.join(made)}): choose one of "
            f"those for this tool's split setting, e.g. {made[-1] if made else 'val'}"
        )
    return _remade_folder_split(checkpoint, ckpt_path, data, split, lists)


def keep_runs_split_keys(checkpoint: dict[str, Any], data: DataConfig, typed: list[str]) -> DataConfig:
    """On the run's own data, the keys that chose its images stay the run's: another value typed for
    this evaluation is refused (it would re-split, or be ignored by the run's lists); a `data=<option>`
    preset's own value is replaced by the run's, as for preprocessing (`eval_preprocessing`)."""
    stored = stored_data(checkpoint)
    if not is_runs_data(stored, data):
        return data
    run = parse_group("data", stored)
    keys = SPLIT_KEYS + (LIST_KEYS if data.name == "imagefolder" else ())
    changed = [key for key in keys if getattr(data, key) != getattr(run, key)]
    refused = [key for key in changed if key in typed_data_keys(typed)]
    if refused:
        asked = " ".join(f"data.{key}={getattr(data, key)}" for key in refused)
        was = " ".join(f"data.{key}={getattr(run, key)}" for key in refused)
        raise ConfigError(
            f"{asked}: the checkpoint was trained with {was} on this data, and its val/test images are the "
            "ones those values chose; other values would re-split the data, putting images it was trained on "
            "into the evaluated split (image folders: the run's stored lists apply instead). Leave these keys "
            "out (the run's are used), or evaluate on other data (data.root=...)."
        )
    if changed:
        log.warning(
            "Using the run's %s (not the data preset's %s): they chose the run's val/test images",
            " ".join(f"data.{key}={getattr(run, key)}" for key in changed),
            " ".join(f"{key}={getattr(data, key)}" for key in changed),
        )
    return replace(data, **{key: getattr(run, key) for key in changed})


def _other_data(stored: dict[str, Any], data: DataConfig, split: str) -> ChosenSplit:
    run = f"data={stored.get('name')}" + (f" data.root={stored['root']}" if stored.get("root") else "")
    if data.name == "imagefolder":
        what = (
            f"data.root={data.root} is not the folder the checkpoint was trained on ({run}): no run split "
            f"applies; its own {split} split is evaluated ({split}/ if it has one, else held out by "
            f"data.split_seed={data.split_seed}). If it is a copy of the run's folder that changed since, "
            "that split can hold training images: evaluate the run's folder itself."
        )
    else:
        what = (
            f"data={data.name} is not the data the checkpoint was trained on ({run}): its own {split} split "
            f"is evaluated (fixed by data.split_seed={data.split_seed})."
        )
    log.info("%s", what)
    return ChosenSplit(None, {"kind": "other_data", "description": what})


def _seeded_split(checkpoint: dict[str, Any], data: DataConfig, split: str) -> ChosenSplit:
    """Digits and CIFAR-10: the run's split is made again by the same seed (CIFAR-10's test: its file)."""
    what = f"the run's {split} split of {data.name}, made again as in training (data.split_seed={data.split_seed})"
    log.info("Evaluating %s", what)
    proof = bool(stored_fingerprints(checkpoint))  # older checkpoints: the seed alone, as before
    return ChosenSplit(None, {"kind": "remade_by_seed", "description": what}, needs_proof=proof)


def _remade_folder_split(
    checkpoint: dict[str, Any], ckpt_path: str, data: DataConfig, split: str, lists: Path
) -> ChosenSplit:
    """No stored lists (a copied checkpoint): the folder is split again, to be proven the run's split."""
    fingerprints = stored_fingerprints(checkpoint)
    if fingerprints and split not in fingerprints:
        raise ConfigError(
            f"split={split}: the checkpoint's run had no {split} split; it had {', '.join(fingerprints)}"
        )
    if not fingerprints:
        raise DataError(
            f"ckpt_path={ckpt_path}: its run's split lists are not in {lists} (was the checkpoint copied "
            f"out of its run directory?), and the checkpoint keeps no fingerprint to check a new split of "
            f"{data.root} against: the folder may have changed since training, and a new split would then "
            f"put training images into {split}. Copy the training run's splits/ folder to {lists}, or "
            "evaluate the checkpoint inside its run directory."
        )
    what = f"the {split} split of {data.root} made again by data.split_seed={data.split_seed}"
    log.warning("No split lists in %s: evaluating %s, if it is the run's (checked next)", lists, what)
    return ChosenSplit(None, {"kind": "remade_and_verified", "description": what}, needs_proof=True)


def check_remade_split(
    checkpoint: dict[str, Any], ckpt_path: str, datamodule: TransferDataModule, split: str
) -> dict[str, Any]:
    """A split made again from the config is the run's only if its fingerprint is the checkpoint's."""
    expected = stored_fingerprints(checkpoint).get(split)
    made = fingerprint(datamodule.split_file_text(split).splitlines())
    data = datamodule.cfg
    where = data.root if data.name == "imagefolder" else datamodule.splits.origin
    if made != expected:
        way_out = (
            f"copy the training run's splits/ folder to {run_splits_dir(ckpt_path)} (its lists are used "
            f"then), or restore {where} as it was"
            if data.name == "imagefolder"
            else f"use the {data.name} data (and library versions) the run used, and leave the data.* keys "
            "that choose images (classes, shots) as they were"
        )
        raise DataError(
            f"the {split} split of {where} made now is not the one ckpt_path={ckpt_path} was evaluated on "
            "in training (its fingerprint differs): the data changed since training, so it may hold images "
            f"the checkpoint was trained on. To evaluate the run's {split} split, {way_out}."
        )
    log.info(
        "The %s split of %s made now is the run's: its fingerprint matches the checkpoint's", split, where
    )
    return {"fingerprint": made, "verified": True}


def _run_list(
    checkpoint: dict[str, Any], data: DataConfig, split: str, list_file: Path, output_dir: Path
) -> ChosenSplit:
    """The run's own list of the split: its images that are still in the folder, checked."""
    lines = read_split_file(list_file)
    _check_list_is_the_runs(checkpoint, list_file, lines, split)
    class_names = list(checkpoint["hyper_parameters"]["class_names"])
    found = stored_split(lines, data, class_names)
    log.info("Evaluating the run's own %s split: %s (%d images)", split, list_file, found.listed)
    source = {
        "kind": "run_split_list",
        "description": f"the run's {split} split, as listed in {list_file}",
        "file": str(list_file),
        "listed": found.listed,
        "missing": len(found.unusable),
        "evaluated": len(found.split),
    }
    if found.unusable:
        report = _report_unusable(found, class_names, data, split, list_file, output_dir)
        source["missing_files"] = str(report)
    return ChosenSplit(_with_other_lists(found.split, split, list_file.parent, data, class_names), source)


def _with_other_lists(
    evaluated: Split, split: str, lists: Path, data: DataConfig, class_names: list[str]
) -> DataSplits:
    """The run's splits, the evaluated one checked; the others as listed (only counted, in the log)."""
    splits = {}
    for name in SPLITS:
        file = lists / f"{name}.txt"
        if name == split:
            splits[name] = evaluated
        elif file.is_file():
            splits[name] = stored_split(read_split_file(file), data, class_names, check=False).split
        else:
            splits[name] = None if name == "test" else Split(evaluated.source, [])
    return DataSplits(class_names, splits["train"], splits["val"], splits["test"], str(data.root))


def _check_list_is_the_runs(
    checkpoint: dict[str, Any], list_file: Path, lines: list[str], split: str
) -> None:
    """A list next to the checkpoint is its run's: the same fingerprint (older checkpoints: the same
    classes and split seed in summary.json), not another run's whose directory it was copied into."""
    expected = stored_fingerprints(checkpoint).get(split)
    if expected is not None:
        same = fingerprint(lines) == expected
    else:
        same = _summary_matches(checkpoint, list_file.parent / "summary.json")
    if not same:
        raise DataError(
            f"{list_file} is not the {split} split the checkpoint's run made (the checkpoint's fingerprint, or "
            "its classes and split seed, differ): the checkpoint was copied into another run's directory, or "
            "the list was edited. "
            "Evaluate the checkpoint in its own run directory, or copy that run's splits/ folder there."
        )


def _summary_matches(checkpoint: dict[str, Any], summary_file: Path) -> bool:
    """Older checkpoints keep no fingerprints: the run's summary.json must name the same classes and seed."""
    if not summary_file.is_file():
        return True  # nothing to compare: the list sits in the checkpoint's run directory
    summary = json.loads(summary_file.read_text())
    same_classes = summary.get("class_names") == list(checkpoint["hyper_parameters"]["class_names"])
    return same_classes and summary.get("split_seed") == stored_data(checkpoint).get("split_seed")


def _report_unusable(
    found: StoredSplit,
    class_names: list[str],
    data: DataConfig,
    split: str,
    list_file: Path,
    output_dir: Path,
) -> Path:
    """missing_files.txt in the eval directory, then: stop, or (data.skip_bad=true) go on with the rest,
    loudly. Metrics on part of a split are not the run's metrics of that split, so going on is asked for."""
    report = output_dir / "missing_files.txt"
    root = found.split.source.root
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{c.path.relative_to(root).as_posix()}\t{c.problem}\n" for c in found.unusable]
        report.write_text("".join(lines))
    shown = ", ".join(
        f"{c.path.relative_to(root).as_posix()} ({c.problem})" for c in found.unusable[:_PATHS_SHOWN]
    )
    more = ", ..." if len(found.unusable) > _PATHS_SHOWN else ""
    what = (
        f"{len(found.unusable)} of {found.listed} images of the run's {split} split ({list_file}) are missing "
        f"or unreadable under {root}: {shown}{more}; all are listed in {report}."
    )
    if not found.split.indices:
        raise DataError(f"{what} None is left: if the folder moved, put it (or a link to it) back at {root}.")
    if not data.skip_bad:
        raise DataError(
            f"{what} Metrics on the rest would not be those of the run's {split} split: restore the files, "
            f"or add data.skip_bad=true to evaluate the {len(found.split)} that remain (metrics.json's "
            "split_source then records how many were left out)."
        )
    emptied = classes_without_images(found.split, class_names)
    if emptied:
        raise DataError(f"{what} No image of class(es) {', '.join(emptied)} is left: restore the files.")
    log.warning("%s Evaluating the %d that remain (data.skip_bad=true).", what, len(found.split))
    return report


def write_evaluated_list(datamodule: TransferDataModule, split: str, output_dir: Path) -> None:
    """splits/<split>.txt in the eval directory: exactly the images evaluated (the run's format)."""
    folder = output_dir / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.txt").write_text(datamodule.split_file_text(split))


def default_split(checkpoint: dict[str, Any], ckpt_path: str) -> str:
    """test if the checkpoint's run had a test split (its fingerprints, or its split lists), else val."""
    fingerprints = stored_fingerprints(checkpoint)
    if fingerprints:
        return "test" if "test" in fingerprints else "val"
    lists = run_splits_dir(ckpt_path)
    if (lists / "summary.json").is_file():
        return "test" if (lists / "test.txt").is_file() else "val"
    return "test"


def calibration_batches(datamodule: Any, batches: int, seed: int, key: str) -> list[np.ndarray]:
    """`batches` batches of training images through the evaluation transform, a seeded sample of all
    classes (the loader's order is by class: its first batches would hold one class). For int8
    calibration and batch-norm re-estimation after pruning; `key` names the setting in the warning."""
    dataset = datamodule.split_dataloader("train").dataset  # the evaluation transform, no augmentation
    if len(dataset) == 0:
        raise DataError(
            f"{key}={batches} reads training images, and the training split has none: give data with one"
        )
    size = datamodule.batch_size
    wanted = batches * size
    if wanted > len(dataset):
        log.warning(
            "%s=%d x data.batch_size=%d: the training split has only %d images; using all of them",
            key,
            batches,
            size,
            len(dataset),
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:wanted]
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=size)
    return [images.float().contiguous().numpy() for images, _ in loader]
