"""What `transferlab analyze` shows: its pictures (PNG bytes, drawn by matplotlib without pyplot, so no
display and no global figure state) and report.html, one self-contained file: the pictures are embedded
as base64 data URIs, so that the file alone can be sent to someone."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.models.calibration import ReliabilityBins

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_ANNOTATED_CLASSES = 20  # more: cells too small for their numbers
TILE_INCHES = 2.2  # one gallery or Grad-CAM image


# --- pictures -----------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def confusion_png(matrix: np.ndarray, class_names: list[str]) -> bytes:
    """Counts and row-normalised (each true class's share, i.e. its recall on the diagonal) side by side."""
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(12.0, 2.0 + 0.45 * len(class_names))
    figure = new_figure(2 * side + 1, side)
    for ax, values, title, fmt in zip(
        figure.subplots(1, 2),
        (matrix, normalised),
        ("Counts", "Row-normalised (share of each true class)"),
        ("{:.0f}", "{:.2f}"),
        strict=True,
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=ax, shrink=0.8)
        _label_axes(ax, class_names, title)
        if len(class_names) <= MAX_ANNOTATED_CLASSES:
            _annotate(ax, values, fmt)
    return to_png(figure)


def _label_axes(ax: Any, class_names: list[str], title: str) -> None:
    ticks = range(len(class_names))
    size = 9 if len(class_names) <= MAX_ANNOTATED_CLASSES else 6
    ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=size)
    ax.set_yticks(ticks, class_names, fontsize=size)
    ax.set(xlabel="Predicted", ylabel="True", title=title)


def _annotate(ax: Any, values: np.ndarray, fmt: str) -> None:
    top = values.max() if values.size else 0
    for (row, col), value in np.ndenumerate(values):
        colour = "white" if top and value > top / 2 else "black"  # readable on dark cells
        ax.text(col, row, fmt.format(value), ha="center", va="center", color=colour, fontsize=8)


@dataclass(frozen=True)
class Tile:
    """One image of a gallery: (H, W, 3) RGB, floats in [0, 1] or uint8, and its caption."""

    image: np.ndarray
    caption: str
    wrong: bool = False  # captioned in red


def tiles_png(tiles: list[Tile], columns: int = 4) -> bytes:
    """The images on a grid, each with its caption."""
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    figure = new_figure(columns * TILE_INCHES, rows * (TILE_INCHES + 0.4))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, tile in zip(axes, tiles, strict=False):
        ax.imshow(tile.image, interpolation="nearest")  # nearest: the pixels the model saw
        ax.set_title(tile.caption, fontsize=8, color="firebrick" if tile.wrong else "black")
    for ax in axes:
        ax.set_axis_off()
    return to_png(figure)


def reliability_png(panels: list[tuple[str, ReliabilityBins, float]]) -> bytes:
    """Per (title, bins, ECE): each confidence bin's accuracy against its mean confidence, the gap to the
    diagonal (perfect calibration) shaded, and how many images fall in each bin."""
    figure = new_figure(5.0 * len(panels), 5.0)
    for ax, (title, bins, ece) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True):
        edges = np.asarray(bins.edges)
        width, centres = np.diff(edges), edges[:-1] + np.diff(edges) / 2
        accuracy = np.nan_to_num(np.asarray(bins.accuracy, dtype=float))
        confidence = np.asarray(bins.confidence, dtype=float)
        ax.bar(centres, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        gap_top = np.where(np.isnan(confidence), accuracy, confidence)
        ax.bar(
            centres, gap_top - accuracy, bottom=accuracy, width=width, color="tab:red", alpha=0.3, label="gap"
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        for x, count in zip(centres, bins.counts, strict=True):
            if count:
                ax.text(x, 0.02, str(count), ha="center", fontsize=7, rotation=90)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence", ylabel="Accuracy")
        ax.set_title(f"{title}\nECE = {ece:.4f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    return to_png(figure)


# --- report.html ----------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else _e(value)


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _picture(pngs: dict[str, bytes], key: str, alt: str) -> str:
    return f'<p><img src="{data_uri(pngs[key])}" alt="{_e(alt)}"></p>' if key in pngs else ""


def report_html(summary: dict[str, Any], pngs: dict[str, bytes], files: list[str]) -> str:
    """The page: summary, confusion matrix, per-class metrics, most confidently wrong images, Grad-CAM,
    calibration; `files`: the report's other files, linked (they sit beside report.html)."""
    sections = [
        _overview(summary),
        "<h2>Confusion matrix</h2>" + _picture(pngs, "confusion_matrix", "confusion matrix"),
        _per_class(summary),
        _top_losses(summary, pngs),
        _gradcam(summary, pngs),
        _calibration(summary, pngs),
        "<h2>Files</h2><p class='note'>Beside this report (the pictures above are embedded): "
        + ", ".join(f'<a href="{_e(name)}">{_e(name)}</a>' for name in files)
        + "</p>",
    ]
    title = f"transferlab analyze: {summary['split']} split"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def _overview(summary: dict[str, Any]) -> str:
    backbone = summary.get("backbone") or {}
    rows = [
        ["checkpoint", summary["ckpt_path"]],
        ["sha256", summary["ckpt_sha256"]],
        ["backbone", f"{backbone.get('name')} ({backbone.get('source')})"],
        ["split", f"{summary['split']}: {summary['split_source'].get('description', '')}"],
        ["images", summary["images"]],
        ["accuracy", summary["accuracy"]],
        ["macro F1", summary["macro_f1"]],
        ["misclassified", summary["misclassified"]],
    ]
    return "<h2>Summary</h2>" + _table(None, rows)


def _per_class(summary: dict[str, Any]) -> str:
    rows = [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in summary["per_class"]]
    return (
        "<h2>Per class</h2>"
        + _table(["class", "precision", "recall", "F1", "support"], rows)
        + "<p class='note'>Support: images of the class in the split. As per_class.csv.</p>"
    )


def _top_losses(summary: dict[str, Any], pngs: dict[str, bytes]) -> str:
    shown = summary["top_losses"]
    head = "<h2>Most confidently wrong</h2>"
    if not shown:
        why = "no image is misclassified" if not summary["misclassified"] else "top_losses=0"
        return head + f"<p>No gallery: {why}.</p>"
    rows = [[i["image"], i["true"], i["predicted"], i["probability"], i["true_probability"]] for i in shown]
    return (
        head
        + f"<p class='note'>The {len(shown)} of {summary['misclassified']} misclassified images with the "
        "highest probability for their wrong class, as the model saw them (resized, cropped); "
        "probabilities after temperature scaling.</p>"
        + _picture(pngs, "top_losses", "most confidently wrong images")
        + _table(["image", "true", "predicted", "probability", "probability of the true class"], rows)
    )


def _gradcam(summary: dict[str, Any], pngs: dict[str, bytes]) -> str:
    cam = summary["gradcam"]
    head = "<h2>Grad-CAM</h2>"
    if "skipped" in cam:
        return head + f"<p>Grad-CAM skipped: {_e(cam['skipped'])}</p>"
    height, width = cam["feature_map"]
    coarse = (
        f" At this image size the layer's map is {height} x {width}: the heat map cannot show a place."
        if height * width == 1
        else f" The layer's map is {height} x {width}, scaled up to the image."
    )
    return (
        head
        + f"<p class='note'>Where the evidence for the predicted class lies (red: most), on {cam['images']} "
        f"images sampled from the split (seed {cam['seed']}); layer <code>{_e(cam['target_layer'])}</code>."
        f"{coarse}</p>" + _picture(pngs, "gradcam", "Grad-CAM overlays")
    )


def _calibration(summary: dict[str, Any], pngs: dict[str, bytes]) -> str:
    rows = [
        ["NLL", summary["nll_before"], summary["nll_after"]],
        ["ECE", summary["ece_before"], summary["ece_after"]],
    ]
    return (
        "<h2>Calibration</h2>"
        + f"<p>Temperature: <b>{summary['temperature']:.4f}</b>. {_e(summary['temperature_note'])}</p>"
        + _table(["", "before scaling (T = 1)", f"after (T = {summary['temperature']:.4f})"], rows)
        + f"<p class='note'>ECE: expected calibration error over {summary['calibration_bins']} confidence "
        "bins, on the analyzed split.</p>" + _picture(pngs, "reliability", "reliability diagrams")
    )
