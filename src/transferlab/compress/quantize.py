"""The job behind `transferlab optimize method=quantize`: an int8 model for CPU inference, with what it
costs in accuracy and gains in size and speed, measured.

The run directory gets model.onnx (fp32, exported and parity-checked exactly as `transferlab export`
does), model.int8.onnx (ONNX Runtime static post-training quantization: QDQ format by default, int8
per-channel weights, uint8 activations whose ranges come from `quantize.calibration_batches` batches of
the checkpoint's TRAINING images, a seeded sample, preprocessed by its evaluation transform), model.json
(export's card, its `file` and `quantization` naming the int8 model) and quantize.json: both models'
metrics on `quantize.split` (eval's torchmetrics), their top-1 agreement, file sizes and CPU latency
(ONNX Runtime, the same session options for both, each timed alone, at batch 1 and 32; in
`quantize.latency_rounds` rounds of `latency_runs` each, the speed-up the median of the rounds' own).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from transferlab.checkpoints import read_checkpoint
from transferlab.compress.timing import (
    LATENCY_BATCHES,
    WARMUP_RUNS,
    Runner,
    median_over_rounds,
    medians_in_rounds,
    round_speedups,
    speedup_over_rounds,
)
from transferlab.config.schema import ExportConfig, OptimizeConfig, QuantizeConfig
from transferlab.errors import ConfigError, DataError, first_line
from transferlab.evaluation import SplitScorer, calibration_batches, checkpoint_data, default_split
from transferlab.files import write_json
from transferlab.inference.export import (
    EXAMPLE_BATCH,
    MODEL_FILES,
    ONNX_FIRST_OPSET,
    PARITY_SPLIT,
    checked_parity,
    export_onnx,
    versions,
)
from transferlab.inference.model import InferenceModel, ModelCard, inference_model
from transferlab.inference.predictors import Predictor, open_exported
from transferlab.runtime import quiet_root_logger_calls

log = logging.getLogger(__name__)

FP32_NAME = MODEL_FILES["onnx"]
INT8_NAME = "model.int8.onnx"
REPORT_NAME = "quantize.json"
CALIBRATORS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}  # ORT's names
QUANTIZED_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass
class QuantizeResult:
    fp32_file: Path
    int8_file: Path
    card_file: Path
    report_file: Path
    report: dict[str, Any]


def quantize(config: OptimizeConfig) -> QuantizeResult:
    """The fp32 export, its int8 quantization and their comparison (see the module)."""
    output_dir = Path(config.paths.output_dir)
    checkpoint = read_checkpoint(config.ckpt_path, trust=config.trust_checkpoint)
    torch.manual_seed(config.seed)
    split = config.quantize.split or default_split(checkpoint, config.ckpt_path)
    # every image first: a data problem stops the run before the export and calibration take minutes
    data = checkpoint_data(checkpoint, config.ckpt_path, config.data, split, config.seed, output_dir)
    check_splits(data.datamodule, split, config)
    calibration = calibration_batches(
        data.datamodule, config.quantize.calibration_batches, config.seed, "quantize.calibration_batches"
    )
    model, card = inference_model(checkpoint, config.ckpt_path)
    del checkpoint
    model = model.float().eval()

    output_dir.mkdir(parents=True, exist_ok=True)
    fp32_file, int8_file = output_dir / FP32_NAME, output_dir / INT8_NAME
    export_fp32(model, card, fp32_file)
    card = quantized_card(card, config.quantize, calibration)
    card_file = card.write(output_dir)
    # export's parity check, with export's defaults: the fp32 file is what int8 is measured against
    parity = checked_parity(model, card, fp32_file, data.datamodule, ExportConfig(ckpt_path=config.ckpt_path))
    log.info("Quantizing %s to int8 (%d calibration images)", fp32_file.name, sum(map(len, calibration)))
    quantize_file(fp32_file, int8_file, calibration, config.quantize, card)

    report = compare(fp32_file, int8_file, data.datamodule, split, config)
    report.update(
        split_source=data.source,
        calibration=card.quantization["calibration"],
        scheme=card.quantization["scheme"],
        fp32_parity=parity,
    )
    report_file = output_dir / REPORT_NAME
    write_json(report_file, report)
    log_summary(report)
    return QuantizeResult(fp32_file, int8_file, card_file, report_file, report)


# --- checks and data ------------------------------------------------------------------------------------


def check_splits(datamodule: Any, split: str, config: OptimizeConfig) -> None:
    """Images to calibrate on (train), to check the fp32 export on (val, as export) and to compare on."""
    counts = {name: sum(per_class.values()) for name, per_class in datamodule.class_counts().items()}
    needed = {
        "train": "quantize.calibration_batches: calibration reads training images",
        PARITY_SPLIT: "the fp32 model's parity check (as export's) runs on them",
        split: f"quantize.split={split}: fp32 and int8 are compared on them",
    }
    for name, why in needed.items():
        if not counts.get(name):
            raise DataError(
                f"ckpt_path={config.ckpt_path}: its {name} split has no images, and {why}; "
                "give data with that split (data.root=...)"
                + (" or choose quantize.split=val" if name == split == "test" else "")
            )


# --- fp32, then int8 ------------------------------------------------------------------------------------


def export_fp32(model: InferenceModel, card: ModelCard, path: Path) -> None:
    """export's ONNX exporter and opset: a backbone that does not export fails with export's one line."""
    backbone = card.backbone_label
    log.info("Exporting %s (backbone %s) as ONNX", card.source_checkpoint["path"], backbone)
    example = torch.zeros(EXAMPLE_BATCH, 3, card.prep.crop_size, card.prep.crop_size)
    export_onnx(model, example, path, ONNX_FIRST_OPSET, backbone)


def quantized_card(card: ModelCard, options: QuantizeConfig, calibration: list[np.ndarray]) -> ModelCard:
    """export's card, describing the int8 file (model.onnx beside it: the fp32 reference)."""
    scheme = {
        "format": options.format,
        "weights": "int8, " + ("per channel" if options.per_channel else "per tensor"),
        "activations": f"uint8, per tensor, {CALIBRATORS[options.calibration_method]} calibration",
        "reduce_range": options.reduce_range,
        "fp32_first_layers": options.fp32_first_layers,
        "quantizer": "onnxruntime.quantization.quantize_static",
    }
    quantization = {
        "file": INT8_NAME,
        "fp32_file": FP32_NAME,
        "scheme": scheme,
        "calibration": {
            "split": "train",
            "batches": len(calibration),
            "images": int(sum(len(batch) for batch in calibration)),
            "transform": "the checkpoint's evaluation transform",
        },
    }
    return replace(
        card,
        format="onnx",
        file=INT8_NAME,
        opset=ONNX_FIRST_OPSET,
        versions=versions("onnx"),
        quantization=quantization,
    )


def quantize_file(
    fp32_file: Path,
    int8_file: Path,
    calibration: list[np.ndarray],
    options: QuantizeConfig,
    card: ModelCard,
    kept_fp32: Callable[[Path], list[str]] | None = None,
) -> None:
    """ORT's pre-processing (shape inference, graph optimisation: folds what quantization would split),
    then static quantization. Its temporary files go to a folder removed afterwards. The nodes left in
    fp32 are `quantize.fp32_first_layers`'s, or `kept_fp32(pre-processed file)`'s (benchmarks/int8_layers.py
    leaves whole kinds of layer)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class CalibrationBatches(CalibrationDataReader):
        """The calibration batches, once each, as ONNX Runtime's calibrator asks for them."""

        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {card.inputs["name"]: batch}

    reader = CalibrationBatches()
    quant_format = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[options.format]
    with tempfile.TemporaryDirectory(prefix="quantize_", dir=int8_file.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_file), str(prepared))
            kept = kept_fp32(prepared) if kept_fp32 else first_layers(prepared, options.fp32_first_layers)
            calibrator_output = io.StringIO()  # its histogram calibrators print to stdout: kept for the log
            # and its quantizer logs a note per layer on the root logger ("Increased scale[...]"): dropped
            with contextlib.redirect_stdout(calibrator_output), quiet_root_logger_calls():
                quantize_static(
                    str(prepared),
                    str(int8_file),
                    reader,
                    quant_format=quant_format,
                    per_channel=options.per_channel,
                    reduce_range=options.reduce_range,
                    activation_type=QuantType.QUInt8,  # u8 activations, s8 weights: x86's fast int8 kernels
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=kept,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATORS[options.calibration_method]),
                )
            log.debug("ONNX Runtime's calibrator: %s", calibrator_output.getvalue().strip())
        except ConfigError:
            raise
        except Exception as error:  # ONNX Runtime's tools raise many types
            int8_file.unlink(missing_ok=True)
            raise ConfigError(
                f"backbone {card.backbone_label} cannot be quantized by ONNX Runtime "
                f"({type(error).__name__}: {first_line(error)})"
            ) from error


def first_layers(model_file: Path, count: int) -> list[str]:
    """The names of the model's first `count` Conv/Gemm/MatMul nodes (ONNX graphs are in topological
    order): the layers `quantize.fp32_first_layers` keeps in fp32."""
    if count == 0:
        return []
    import onnx

    nodes = onnx.load(str(model_file), load_external_data=False).graph.node
    layers = [node.name for node in nodes if node.op_type in QUANTIZED_LAYERS]
    if count >= len(layers):
        raise ConfigError(
            f"quantize.fp32_first_layers={count} leaves none of the model's {len(layers)} Conv/Gemm/MatMul "
            f"layers to int8: choose at most {len(layers) - 1} (the stem is 1-3)"
        )
    return layers[:count]


# --- the comparison -------------------------------------------------------------------------------------


def compare(
    fp32_file: Path, int8_file: Path, datamodule: Any, split: str, config: OptimizeConfig
) -> dict[str, Any]:
    """Both models on the split (metrics, agreement), their sizes and latencies: quantize.json."""
    models = {"fp32": open_exported(fp32_file, device="cpu"), "int8": open_exported(int8_file, device="cpu")}
    loader = datamodule.split_dataloader(split)
    scores, agreement, images = split_scores(models, loader, datamodule.num_classes, split)
    del models  # their sessions' threads would compete with the timed ones
    sample = first_images(loader, max(LATENCY_BATCHES))
    latency = latencies({"fp32": fp32_file, "int8": int8_file}, sample, config)
    report: dict[str, Any] = {
        "method": "quantize",
        "split": split,
        "images": images,
        "top1_agreement": agreement,
    }
    for name, path in (("fp32", fp32_file), ("int8", int8_file)):
        report[name] = {"file": path.name, "size_bytes": path.stat().st_size, **scores[name], **latency[name]}
    report["size_ratio"] = report["fp32"]["size_bytes"] / report["int8"]["size_bytes"]
    report["speedup"] = {str(b): ratio for b, ratio in latency["speedup"].items()}
    report["speedup_rounds"] = {str(b): ratios for b, ratios in latency["speedup_rounds"].items()}
    report["accuracy_change"] = report["int8"][f"{split}/acc"] - report["fp32"][f"{split}/acc"]
    report["latency"] = latency["settings"]
    return report


def split_scores(
    models: dict[str, Predictor], loader: DataLoader, num_classes: int, split: str
) -> tuple[dict[str, dict[str, float]], float, int]:
    """Each model's metrics on the loader's images (eval's `SplitScorer`, named as eval's metrics.json:
    `<split>/acc`, ...), and how often their top-1 classes agree."""
    scorers = {name: SplitScorer(num_classes, split) for name in models}
    same, images = 0, 0
    for batch, targets in loader:
        batch = batch.float().contiguous()
        top1 = {}
        for name, model in models.items():
            logits = model(batch)
            scorers[name].update(logits, targets)
            top1[name] = logits.argmax(dim=1)
        same += int((top1["fp32"] == top1["int8"]).sum())
        images += len(batch)
    return {name: scorer.scores() for name, scorer in scorers.items()}, same / images, images


def first_images(loader: DataLoader, count: int) -> np.ndarray:
    """`count` real images of the split (repeated when it has fewer): the latency's input."""
    images = torch.cat([batch for batch, _ in _take(loader, count)])
    repeats = -(-count // len(images))
    return images.repeat(repeats, 1, 1, 1)[:count].float().contiguous().numpy()


def _take(loader: DataLoader, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    seen = 0
    for batch in loader:
        yield batch
        seen += len(batch[0])
        if seen >= count:
            return


def latencies(files: dict[str, Path], images: np.ndarray, config: OptimizeConfig) -> dict[str, Any]:
    """Each model's latency (the median of its rounds' medians) at each batch size, each timed alone, in
    rounds of blocks (`timing.medians_in_rounds`); fp32's time over int8's, round by round."""
    rounds = config.quantize.latency_rounds
    medians = medians_in_rounds(
        lambda name: onnxruntime_runner(files[name], config.threads),
        list(files),
        images,
        config.latency_runs,
        rounds,
    )
    found: dict[str, Any] = {
        name: {f"latency_ms_batch{b}": ms for b, ms in per_batch.items()}
        for name, per_batch in median_over_rounds(medians).items()
    }
    found["speedup"] = speedup_over_rounds(medians, "fp32", "int8")
    found["speedup_rounds"] = round_speedups(medians, "fp32", "int8")
    order = [*files, *reversed(files)]
    found["settings"] = {
        "runtime": "onnxruntime, CPUExecutionProvider",
        "intra_op_num_threads": config.threads or "onnxruntime's default",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "runs": 2 * -(-config.latency_runs // 2),
        "rounds": rounds,
        "order": "rounds of blocks " + ", ".join(order) + ", one session alive at a time",
        "warmup_runs": WARMUP_RUNS,
        "batch_sizes": list(LATENCY_BATCHES),
        "cpu_count": os.cpu_count(),
    }
    return found


def onnxruntime_runner(path: Path, threads: int) -> Runner:
    """A forward pass of the model in a session of its own (`threads`: intra-op; 0 = ONNX Runtime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {input_name: batch})


def log_summary(report: dict[str, Any]) -> None:
    split, fp32, int8 = report["split"], report["fp32"], report["int8"]

    def latency(batch: int, digits: int) -> str:
        rounds = report["speedup_rounds"][str(batch)]
        spread = f", the median of rounds {min(rounds):.2f}-{max(rounds):.2f}" if len(rounds) > 1 else ""
        return (
            f"batch {batch} {fp32[f'latency_ms_batch{batch}']:.{digits}f} -> "
            f"{int8[f'latency_ms_batch{batch}']:.{digits}f} ms (x{report['speedup'][str(batch)]:.2f}{spread})"
        )

    log.info(
        "%s/acc fp32 %.4f, int8 %.4f; top-1 agreement %.4f on %d images; size %.1f -> %.1f MB; latency %s, %s",
        split,
        fp32[f"{split}/acc"],
        int8[f"{split}/acc"],
        report["top1_agreement"],
        report["images"],
        fp32["size_bytes"] / 1e6,
        int8["size_bytes"] / 1e6,
        latency(1, 2),
        latency(32, 1),
    )
    log.info("Wrote %s, %s, model.json and %s", FP32_NAME, INT8_NAME, REPORT_NAME)
