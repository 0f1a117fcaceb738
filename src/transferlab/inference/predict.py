"""The job behind `transferlab predict`: class probabilities for new images.

Images are read and preprocessed exactly as the model's evaluation transform (its stored preprocessing,
never the training augmentation): the same reader (EXIF orientation, any mode to RGB), resize, center
crop, normalisation. A file that cannot be read is listed with its reason in predict_errors.csv; the
others are still predicted, and the exit status says that some failed.
"""

from __future__ import annotations

import csv
import glob
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from transferlab.config.parse import parse_tool_config
from transferlab.config.schema import PIL_MAX_PIXELS, PredictConfig
from transferlab.data.datamodule import resolve_num_workers
from transferlab.data.images import (
    EMPTY_IMAGE,
    refused_by_pil,
    set_pixel_limit,
    to_rgb,
    too_large,
)
from transferlab.data.scan import images_under
from transferlab.data.transforms import Preprocessing, eval_transform, interpolation_mode, normalize
from transferlab.errors import ConfigError, DataError
from transferlab.files import atomic_write, write_json
from transferlab.inference.model import ModelCard
from transferlab.inference.predictors import Predictor, open_checkpoint, open_exported

log = logging.getLogger(__name__)

PREDICTIONS_FILE, ERRORS_FILE, JSON_FILE = "predictions.csv", "predict_errors.csv", "predictions.json"
_GLOB_CHARACTERS = "*?["


# --- which files -----------------------------------------------------------------------------------------


def collect_inputs(inputs: str) -> list[Path]:
    """The files `inputs=` names: one file, a folder's images (recursive, hidden entries skipped, sorted),
    a glob's matches, or the paths listed in a .txt file (one per line; relative to the list's folder; #
    starts a comment). Listed or named files that turn out not to be images are kept: they are reported
    as errors."""
    path = Path(inputs).expanduser()
    if path.is_dir():
        found = sorted(images_under(path)[0])  # as training reads a folder: links followed, each once
        if not found:
            raise ConfigError(f"inputs={inputs}: the folder holds no image files ({_extensions()})")
        return found
    if path.is_file():
        return _listed_paths(path) if path.suffix.lower() == ".txt" else [path]
    if any(c in inputs for c in _GLOB_CHARACTERS):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise ConfigError(f"inputs={inputs}: the pattern matches no file")
        return found
    raise ConfigError(
        f"inputs={inputs}: no such file or folder (give an image, a folder, a glob or a .txt list)"
    )


def _extensions() -> str:
    from transferlab.data.images import IMAGE_EXTENSIONS

    return " ".join(IMAGE_EXTENSIONS)


def _listed_paths(list_file: Path) -> list[Path]:
    lines = [line.split("#", 1)[0].strip() for line in list_file.read_text().splitlines()]
    paths = [Path(line).expanduser() for line in lines if line]
    if not paths:
        raise ConfigError(f"inputs={list_file}: the list names no file")
    return [p if p.is_absolute() else list_file.parent / p for p in paths]


# --- reading and test-time augmentation --------------------------------------------------------------------


def tta_views(prep: Preprocessing, tta: str) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (views, 3, H, W) normalised tensors: the evaluation transform, plus its horizontal
    flip (hflip), or the four corner crops and the center crop of the resized image (five_crop)."""
    single = eval_transform(prep)
    if tta == "none":
        return lambda image: single(image).unsqueeze(0)
    if tta == "hflip":

        def with_flip(image: Image.Image) -> torch.Tensor:
            view = single(image)
            return torch.stack([view, v2.functional.horizontal_flip(view)])

        return with_flip
    resize = v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(prep.resize_size, interpolation=interpolation_mode(prep.interpolation), antialias=True),
        ]
    )
    crops = v2.FiveCrop(prep.crop_size)
    finish = v2.Compose(normalize(prep))
    return lambda image: torch.stack([finish(crop) for crop in crops(resize(image))])


class TooLarge(ValueError):
    """An image over `max_image_pixels`: refused from its header, never decoded."""


def read_image(path: Path, max_pixels: int = PIL_MAX_PIXELS) -> Image.Image:
    """As training reads: EXIF orientation, any mode to 8-bit RGB (`images.to_rgb`); an image over
    `max_pixels` is refused before it is decoded, as training's scan refuses it."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise TooLarge(refused_by_pil(err, max_pixels, key="max_image_pixels")) from err
    with image:
        if problem := too_large(*image.size, max_pixels, key="max_image_pixels"):
            raise TooLarge(problem)
        return to_rgb(image)


class PredictImages(Dataset):
    """(index, views or None, why it failed): a bad file does not stop the loader."""

    def __init__(
        self,
        paths: list[Path],
        views: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = PIL_MAX_PIXELS,
    ) -> None:
        self.paths, self.views, self.max_pixels = paths, views, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        set_pixel_limit(self.max_pixels)  # in each loader process
        try:
            return index, self.views(read_image(self.paths[index], self.max_pixels)), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return index, None, _reason(err, self.paths[index])


def _reason(err: BaseException, path: Path) -> str:
    if isinstance(err, UnidentifiedImageError) and path.is_file() and path.stat().st_size == 0:
        return EMPTY_IMAGE  # as the training scan says it
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(err, TooLarge):
        return str(err)
    detail = str(err).strip().splitlines()
    return f"not a readable image ({type(err).__name__}{': ' + detail[0] if detail else ''})"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    good = [(i, views) for i, views, _ in items if views is not None]
    return {
        "indices": [i for i, _ in good],
        "views": torch.stack([views for _, views in good]) if good else None,
        "failed": [(i, reason) for i, views, reason in items if views is None],
    }


# --- the job ------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    path: str
    probabilities: torch.Tensor  # (classes,)


def predict_probabilities(
    predictor: Predictor, loader: DataLoader, total: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Per batch: the indices, their probabilities (views averaged), and the failed (index, reason)."""
    with _progress(total) as advance:
        for batch in loader:
            probabilities = None
            if batch["views"] is not None:
                views = batch["views"]  # (batch, views, 3, H, W)
                logits = predictor(views.flatten(0, 1))
                probabilities = torch.softmax(logits.float(), dim=1).unflatten(0, views.shape[:2]).mean(dim=1)
            yield batch["indices"], probabilities, batch["failed"]
            advance(len(batch["indices"]) + len(batch["failed"]))


class _progress:
    """A rich progress bar on a terminal; a log line every tenth of the images otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.bar = total, 0, None

    def __enter__(self) -> Callable[[int], None]:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(transient=True, console=Console(stderr=True))  # stdout may be a file
            self.bar.start()
            task = self.bar.add_task("predict", total=self.total)
            return lambda n: self.bar.advance(task, n)
        step = max(1, self.total // 10)

        def advance(n: int) -> None:
            before, self.done = self.done, self.done + n
            if self.done // step != before // step or self.done == self.total:
                log.info("read %d / %d files", self.done, self.total)  # failures are counted at the end

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def open_predictor(config: PredictConfig) -> Predictor:
    if config.ckpt_path is not None:
        return open_checkpoint(config.ckpt_path, config.device, trust=config.trust_checkpoint)
    return open_exported(config.model_path, config.device)


def check_tta(card: ModelCard, tta: str, model: str) -> None:
    if tta == "hflip" and not card.allow_hflip:
        raise ConfigError(
            f"tta=hflip: {model} was trained with data.allow_hflip=false (a flip changes the class); "
            "use tta=none or tta=five_crop"
        )


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every input; write predictions.csv (and .json), predict_errors.csv when files failed."""
    config = parse_tool_config(cfg, PredictConfig, "predict.yaml")
    paths = collect_inputs(config.inputs)  # a missing input fails before the model is read
    predictor = open_predictor(config)
    card = predictor.card
    check_tta(card, config.tta, config.ckpt_path or config.model_path)
    top_k = min(config.top_k, len(card.class_names))
    if top_k < config.top_k:
        log.warning("top_k=%d: the model has %d classes; every one is listed", config.top_k, top_k)
    loader = DataLoader(
        PredictImages(paths, tta_views(card.prep, config.tta), config.max_image_pixels),
        batch_size=config.batch_size,
        num_workers=resolve_num_workers(config.num_workers),
        collate_fn=_collate,
    )
    log.info(
        "Predicting %d files with %s (tta=%s)", len(paths), config.ckpt_path or config.model_path, config.tta
    )
    predictions: dict[int, torch.Tensor] = {}
    failures: dict[int, str] = {}
    for indices, probabilities, failed in predict_probabilities(predictor, loader, len(paths)):
        if probabilities is not None:
            predictions.update(zip(indices, probabilities, strict=True))
        failures.update(failed)
    output_dir = Path(config.paths.output_dir)
    rows = [Prediction(str(paths[i]), predictions[i]) for i in sorted(predictions)]
    write_predictions(output_dir / PREDICTIONS_FILE, rows, card.class_names, top_k)
    if config.write_json:
        write_json(output_dir / JSON_FILE, predictions_json(rows, card.class_names, top_k))
    summary = {"predicted": len(rows), "failed": len(failures), "output_dir": str(output_dir)}
    log.info("Wrote %s (%d images)", output_dir / PREDICTIONS_FILE, len(rows))
    if failures:
        write_errors(output_dir / ERRORS_FILE, [(str(paths[i]), failures[i]) for i in sorted(failures)])
        raise DataError(
            f"{len(failures)} of {len(paths)} files could not be predicted (the reason of each in "
            f"{output_dir / ERRORS_FILE}); the other {len(rows)} are in {output_dir / PREDICTIONS_FILE}"
        )
    return summary


def top_classes(probabilities: torch.Tensor, class_names: list[str], k: int) -> list[tuple[str, float]]:
    values, indices = probabilities.topk(k)
    return [(class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def write_predictions(path: Path, rows: list[Prediction], class_names: list[str], k: int) -> None:
    header = ["path"] + [f"{name}_{rank}" for rank in range(1, k + 1) for name in ("class", "probability")]
    lines = [header]
    for row in rows:
        cells = [row.path]
        for name, probability in top_classes(row.probabilities, class_names, k):
            cells += [name, f"{probability:.6f}"]
        lines.append(cells)
    _write_csv(path, lines)


def predictions_json(rows: list[Prediction], class_names: list[str], k: int) -> list[dict[str, Any]]:
    return [
        {
            "path": row.path,
            "top_k": [
                {"class": name, "probability": p}
                for name, p in top_classes(row.probabilities, class_names, k)
            ],
        }
        for row in rows
    ]


def write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    _write_csv(path, [["path", "reason"], *[list(e) for e in errors]])


def _write_csv(path: Path, lines: list[list[str]]) -> None:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))
