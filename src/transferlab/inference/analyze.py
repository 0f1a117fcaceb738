"""The job behind `transferlab analyze`: what a checkpoint gets wrong on a split of its own data.

Into <run dir>/report/: the confusion matrix (counts and row-normalised), per-class precision, recall,
F1 and support (per_class.csv), the most confidently wrong images, Grad-CAM overlays of a sample, and
calibration before and after temperature scaling (reliability diagrams, ECE, NLL), all in summary.json
and in one self-contained report.html; the same pictures go to every TensorBoard logger configured.

The split is the checkpoint's own (`evaluation.checkpoint_data`: never images it was trained on). The
temperature is the checkpoint's (calibrate=true), else one fitted now on the val split, never on the
analyzed split (its "after" numbers would flatter it), except when that is the val split itself.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from transferlab.build import instantiate_group
from transferlab.checkpoints import read_checkpoint
from transferlab.config.parse import parse_tool_config
from transferlab.config.schema import AnalyzeConfig
from transferlab.data.datasets import SplitDataset
from transferlab.data.transforms import Preprocessing
from transferlab.errors import DataError
from transferlab.evaluation import CheckpointData, checkpoint_data
from transferlab.files import atomic_write, write_json
from transferlab.inference import report
from transferlab.inference.gradcam import CamTarget, CamUnsupported, cam_target, grad_cam, overlay
from transferlab.inference.model import inference_model
from transferlab.inference.predictors import resolve_device
from transferlab.models.calibration import expected_calibration_error, fit_temperature, reliability_bins

log = logging.getLogger(__name__)

REPORT_DIR = "report"
PER_CLASS_HEADER = ["class", "precision", "recall", "f1", "support"]
GALLERY_COLUMNS = 4


@dataclass
class Predictions:
    """The network's logits on a split (before any temperature), with the true labels."""

    logits: torch.Tensor  # (N, K) float32
    targets: torch.Tensor  # (N,) int64

    def probabilities(self, temperature: float) -> torch.Tensor:
        return torch.softmax(self.logits.double() / temperature, dim=1)


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Analyze `ckpt_path` on `split`; writes <run dir>/report/ and returns summary.json's content."""
    config = parse_tool_config(cfg, AnalyzeConfig, "analyze.yaml")
    device = resolve_device(config.device)  # device=cuda without one: told before any work
    loggers = instantiate_group(config.logger)  # (a logger's wrong argument too)
    checkpoint = read_checkpoint(config.ckpt_path, trust=config.trust_checkpoint)
    run_dir = Path(config.paths.output_dir)
    data = checkpoint_data(checkpoint, config.ckpt_path, config.data, config.split, config.seed, run_dir)
    model, card = inference_model(checkpoint, config.ckpt_path)
    network = nn.Sequential(model.backbone, model.head).to(device).eval()  # logits before any temperature
    loader = data.datamodule.split_dataloader(config.split)
    predictions = predict(network, loader, device)
    temperature = choose_temperature(checkpoint, config.split, data, network, predictions, device)
    analyzed = Analyzed(loader.dataset, data.preprocessing, predictions, card.class_names, temperature.value)
    summary = {
        **split_metrics(predictions, temperature.value, card.class_names, config.calibration_bins),
        "temperature_source": temperature.source,
        "temperature_note": temperature.note,
        "ckpt_path": str(Path(config.ckpt_path).expanduser().resolve()),
        "ckpt_sha256": card.source_checkpoint["sha256"],
        "backbone": card.backbone,
        "split": config.split,
        "split_source": data.source,
        "class_names": card.class_names,
    }
    pngs = pictures(network, analyzed, config, summary, batch_size=max(1, loader.batch_size or 1))
    write_report(run_dir / REPORT_DIR, summary, pngs)
    log_to_loggers(loggers, config.split, summary, pngs)
    return summary


def pictures(
    network: nn.Sequential,
    analyzed: Analyzed,
    config: AnalyzeConfig,
    summary: dict[str, Any],
    batch_size: int,
) -> dict[str, bytes]:
    """The report's pictures by name; the gallery's and Grad-CAM's entries go into `summary` (they are
    left out when there is nothing to show: no wrong image, Grad-CAM skipped)."""
    pngs = {
        "confusion_matrix": report.confusion_png(
            np.asarray(summary["confusion_matrix"]), analyzed.class_names
        ),
        "reliability": reliability_png(analyzed.predictions, analyzed.temperature, config.calibration_bins),
    }
    summary["top_losses"], pngs["top_losses"] = top_losses(analyzed, config.top_losses)
    summary["gradcam"], pngs["gradcam"] = gradcam_section(network, analyzed, config, batch_size)
    return {key: png for key, png in pngs.items() if png is not None}


@torch.inference_mode()
def predict(network: nn.Module, loader: DataLoader, device: torch.device) -> Predictions:
    """Logits of every image of the loader, in its order (the split's: evaluation loaders do not shuffle)."""
    logits, targets = [], []
    for images, labels in loader:
        logits.append(network(images.to(device)).float().cpu())
        targets.append(labels)
    if not logits:
        raise DataError("the analyzed split holds no images")
    return Predictions(torch.cat(logits), torch.cat(targets).long())


# --- temperature and calibration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Temperature:
    """The temperature the report scales by, and where it comes from."""

    value: float
    source: str  # checkpoint | val | none
    note: str  # the sentence the report shows


def choose_temperature(
    checkpoint: dict[str, Any],
    split: str,
    data: CheckpointData,
    network: nn.Module,
    analyzed: Predictions,
    device: torch.device,
) -> Temperature:
    """The checkpoint's; else fitted now on the val split (the analyzed one only when it is val)."""
    stored = checkpoint.get("calibration")
    if stored:
        note = (
            f"Stored in the checkpoint (calibrate=true): fitted on its {stored.get('split')} split "
            f"({stored.get('images')} images) after training."
        )
        if stored.get("split") == split:
            note += " That is the analyzed split: the numbers after scaling are optimistic."
        return Temperature(float(stored["temperature"]), "checkpoint", note)
    if split == "val":
        note = "Fitted now on the val split, which is the analyzed split: the numbers after scaling are optimistic."
        return Temperature(fit_temperature(analyzed.logits, analyzed.targets), "val", note)
    datamodule = data.datamodule
    if not datamodule.has_split("val") or len(datamodule.splits.val) == 0:
        note = "The checkpoint is not calibrated and there is no val split to fit a temperature on: none (T = 1)."
        return Temperature(1.0, "none", note)
    val = predict(network, datamodule.split_dataloader("val"), device)
    note = (
        f"The checkpoint is not calibrated: fitted now on the val split ({len(val.targets)} images), "
        f"not on the analyzed {split} split."
    )
    return Temperature(fit_temperature(val.logits, val.targets), "val", note)


def calibration_scores(predictions: Predictions, temperature: float, bins: int) -> tuple[float, float]:
    """NLL and ECE of the predictions with the logits divided by `temperature`."""
    scaled = predictions.logits.double() / temperature
    nll = float(F.cross_entropy(scaled, predictions.targets))
    return nll, expected_calibration_error(torch.softmax(scaled, dim=1), predictions.targets, bins)


def reliability_png(predictions: Predictions, temperature: float, bins: int) -> bytes:
    panels = []
    for title, t in (("Before temperature scaling", 1.0), (f"After (T = {temperature:.3f})", temperature)):
        table = reliability_bins(predictions.probabilities(t), predictions.targets, bins)
        panels.append((title, table, calibration_scores(predictions, t, bins)[1]))
    return report.reliability_png(panels)


# --- metrics ----------------------------------------------------------------------------------------------


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, classes: int) -> np.ndarray:
    """(K, K) counts: rows the true class, columns the predicted one (torchmetrics, as training's)."""
    return multiclass_confusion_matrix(predicted, targets, classes).numpy()


def per_class_rows(
    predicted: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class, by torchmetrics (0 where undefined: its zero_division)."""
    k = len(class_names)
    scores = [
        score(predicted, targets, k, average=None).tolist()
        for score in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    ]
    support = torch.bincount(targets, minlength=k).tolist()
    return [
        {"class": name, "precision": p, "recall": r, "f1": f, "support": int(n)}
        for name, p, r, f, n in zip(class_names, *scores, support, strict=True)
    ]


def split_metrics(
    predictions: Predictions, temperature: float, class_names: list[str], bins: int
) -> dict[str, Any]:
    """summary.json's numbers: accuracy, macro scores, confusion matrix, per class, calibration."""
    predicted = predictions.logits.argmax(dim=1)
    matrix = confusion_matrix(predicted, predictions.targets, len(class_names))
    rows = per_class_rows(predicted, predictions.targets, class_names)
    (nll_before, ece_before), (nll_after, ece_after) = (
        calibration_scores(predictions, t, bins) for t in (1.0, temperature)
    )
    return {
        "images": len(predictions.targets),
        "accuracy": float((predicted == predictions.targets).double().mean()),
        "misclassified": int((predicted != predictions.targets).sum()),
        "macro_precision": float(np.mean([r["precision"] for r in rows])),
        "macro_recall": float(np.mean([r["recall"] for r in rows])),
        "macro_f1": float(np.mean([r["f1"] for r in rows])),
        "confusion_matrix": matrix.tolist(),
        "per_class": [{**r, **{k: float(r[k]) for k in ("precision", "recall", "f1")}} for r in rows],
        "temperature": float(temperature),
        "calibration_bins": bins,
        "nll_before": nll_before,
        "nll_after": nll_after,
        "ece_before": ece_before,
        "ece_after": ece_after,
    }


# --- images -------------------------------------------------------------------------------------------


@dataclass
class Analyzed:
    """The analyzed split: its images (in the loader's order), the model's predictions, the classes."""

    dataset: SplitDataset
    prep: Preprocessing
    predictions: Predictions
    class_names: list[str]
    temperature: float

    def as_seen(self, position: int) -> tuple[torch.Tensor, np.ndarray]:
        """The image at `position` as the model gets it (normalised) and as a person sees that
        (de-normalised: resized and cropped, (H, W, 3) in [0, 1])."""
        normalised, _ = self.dataset[position]
        mean = torch.tensor(self.prep.mean).view(3, 1, 1)
        std = torch.tensor(self.prep.std).view(3, 1, 1)
        return normalised, (normalised * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def describe(self, position: int) -> str:
        """Where the image comes from (its file, or dataset[index])."""
        return self.dataset.split.source.describe(self.dataset.split.indices[position])

    def caption(self, position: int, probability: float | None = None) -> tuple[str, bool]:
        """'true: cat / pred: dog (0.93)', and whether the prediction is wrong."""
        true = int(self.predictions.targets[position])
        pred = int(self.predictions.logits[position].argmax())
        shown = f" ({probability:.2f})" if probability is not None else ""
        return f"true: {self.class_names[true]}\npred: {self.class_names[pred]}{shown}", true != pred


def top_losses(analyzed: Analyzed, count: int) -> tuple[list[dict[str, Any]], bytes | None]:
    """The `count` misclassified images with the highest (calibrated) probability for their wrong class:
    their entries for summary.json and their gallery (None when there is none)."""
    predictions, names = analyzed.predictions, analyzed.class_names
    probabilities = predictions.probabilities(analyzed.temperature)
    confidence, predicted = probabilities.max(dim=1)
    wrong = torch.nonzero(predicted != predictions.targets).flatten()
    order = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)][:count].tolist()
    entries, tiles = [], []
    for position in order:
        true = int(predictions.targets[position])
        entries.append(
            {
                "image": analyzed.describe(position),
                "true": names[true],
                "predicted": names[int(predicted[position])],
                "probability": float(confidence[position]),
                "true_probability": float(probabilities[position, true]),
            }
        )
        caption, _ = analyzed.caption(position, float(confidence[position]))
        tiles.append(report.Tile(analyzed.as_seen(position)[1], caption, wrong=True))
    return entries, report.tiles_png(tiles, GALLERY_COLUMNS) if tiles else None


def gradcam_section(
    network: nn.Sequential, analyzed: Analyzed, config: AnalyzeConfig, batch_size: int
) -> tuple[dict[str, Any], bytes | None]:
    """Grad-CAM overlays of a seeded sample of the split for the predicted class, or why there are none
    (an unsupported model is skipped, said in the log and the report, never a failure)."""
    if config.gradcam_images == 0:
        return {"skipped": "gradcam_images=0"}, None
    generator = torch.Generator().manual_seed(config.seed)
    sample = torch.randperm(len(analyzed.dataset), generator=generator)[: config.gradcam_images]
    positions = sorted(sample.tolist())
    try:
        target = cam_target(network[0])
        tiles, grid = gradcam_tiles(network, target, analyzed, positions, batch_size)
    except CamUnsupported as reason:
        log.warning("Grad-CAM skipped: %s", reason)
        return {"skipped": str(reason)}, None
    section = {
        "target_layer": f"backbone.{target.name}",
        "feature_map": list(grid),  # 1 x 1: no place to show at this image size
        "images": len(positions),
        "seed": config.seed,
        "sample": [analyzed.describe(p) for p in positions],
    }
    return section, report.tiles_png(tiles, GALLERY_COLUMNS)


def gradcam_tiles(
    network: nn.Module, target: CamTarget, analyzed: Analyzed, positions: list[int], batch_size: int
) -> tuple[list[report.Tile], tuple[int, int]]:
    """The overlays, a data batch at a time (a large sample must not hold every image's graph at once),
    and the size of the layer's feature map."""
    predicted = analyzed.predictions.logits.argmax(dim=1)
    tiles, grid = [], (0, 0)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        seen = [analyzed.as_seen(p) for p in chunk]
        images = torch.stack([normalised for normalised, _ in seen])
        heat = grad_cam(network, target, images, [int(predicted[p]) for p in chunk])
        grid = heat.grid
        for position, (_, visible), cam in zip(chunk, seen, heat.maps, strict=True):
            caption, wrong = analyzed.caption(position)
            tiles.append(report.Tile(overlay(visible, cam), caption, wrong=wrong))
    return tiles, grid


# --- output ------------------------------------------------------------------------------------------------


def per_class_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_CLASS_HEADER, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **{key: f"{row[key]:.6f}" for key in ("precision", "recall", "f1")}})
    return buffer.getvalue()


def write_report(folder: Path, summary: dict[str, Any], pngs: dict[str, bytes]) -> None:
    """The pictures, per_class.csv, summary.json and report.html (pictures embedded), each atomically."""
    summary["files"] = {key: f"{key}.png" for key in pngs}
    for key, png in pngs.items():
        atomic_write(folder / f"{key}.png", lambda f, png=png: f.write(png))
    text = per_class_csv(summary["per_class"])
    atomic_write(folder / "per_class.csv", lambda f: f.write(text.encode()))
    write_json(folder / "summary.json", summary)
    files = ["summary.json", "per_class.csv", *summary["files"].values()]
    page = report.report_html(summary, pngs, files)
    atomic_write(folder / "report.html", lambda f: f.write(page.encode()))
    log.info("Wrote %s", folder / "report.html")


SCALARS = ("accuracy", "macro_f1", "nll_before", "nll_after", "ece_before", "ece_after", "temperature")


def log_to_loggers(loggers: list[Any], split: str, summary: dict[str, Any], pngs: dict[str, bytes]) -> None:
    """The numbers to every logger configured; the pictures to those that take images (TensorBoard)."""
    from PIL import Image

    prefix = f"analyze/{split}"
    for logger in loggers:
        logger.log_metrics({f"{prefix}/{key}": float(summary[key]) for key in SCALARS}, step=0)
        add_image = getattr(logger.experiment, "add_image", None)
        for key, png in pngs.items() if add_image is not None else ():
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            add_image(f"{prefix}/{key}", pixels, global_step=0, dataformats="HWC")
        logger.finalize("success")
