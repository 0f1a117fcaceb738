"""The job behind `transferlab export`: a checkpoint as a deployable model file (ONNX or TorchScript) with
its model card (model.json), trusted only once it gives the checkpoint's own outputs.

The run directory gets model.onnx or model.pt, model.json and parity.json. Before success is reported the
exported file is loaded back the way `predict` loads it (`predictors.open_exported`: ONNX Runtime, or
torch.jit.load) and compared with the checkpoint's PyTorch `InferenceModel`, both fp32 on the CPU, on
real images: the checkpoint's own val split, in loader order, up to `parity_images`. It passes when the
largest absolute logit difference is at most `parity_atol` and the top-1 class is the same on every image,
at a batch size above one and at a batch of one (the batch dimension is dynamic). A file that fails is
renamed <file>.failed, so that nothing deploys it by mistake; model.json and parity.json stay beside it.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from transferlab.checkpoints import read_checkpoint
from transferlab.config.parse import parse_tool_config
from transferlab.config.schema import ExportConfig
from transferlab.errors import ConfigError, DataError, first_line
from transferlab.evaluation import PREPROCESSING_KEYS, checkpoint_data, typed_data_keys
from transferlab.files import atomic_write, write_json
from transferlab.inference.model import (
    CARD_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    InferenceModel,
    ModelCard,
    inference_model,
)
from transferlab.inference.predictors import Predictor, TorchPredictor, open_exported
from transferlab.runtime import command_line_overrides, quiet_loggers

log = logging.getLogger(__name__)

MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
PARITY_NAME = "parity.json"
FAILED_SUFFIX = ".failed"
PARITY_SPLIT = "val"
PARITY_BATCH = 16  # images per batch of the check (the last may be smaller); a batch of one is checked too
EXAMPLE_BATCH = 2  # the example input's batch: a batch of 1 would let the exporter fix the dimension at 1
ONNX_FIRST_OPSET = 18  # the dynamo exporter's own; lower ones are a conversion that may fail
DEPRECATED_JIT = r"`torch\.jit\.\w+` is deprecated"  # recent torch warns so; TorchScript still works
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
PROTOBUF_LIMIT = 2**31 - 2**26  # an ONNX file holds at most 2 GiB; beyond, weights go to <file>.data


@dataclass
class ExportResult:
    model_file: Path
    card_file: Path
    parity_file: Path
    parity: dict[str, Any]


def export(cfg: DictConfig) -> ExportResult:
    """Export `ckpt_path` as `format` into the run directory, then check its parity (see the module)."""
    config = parse_tool_config(cfg, ExportConfig, "export.yaml")
    refuse_preprocessing_keys()
    _check_opset(config)
    output_dir = Path(config.paths.output_dir)
    checkpoint = read_checkpoint(config.ckpt_path, trust=config.trust_checkpoint)
    torch.manual_seed(config.seed)
    # the parity images first: a data problem stops the export before the minutes an exporter can take
    data = checkpoint_data(checkpoint, config.ckpt_path, config.data, PARITY_SPLIT, config.seed, output_dir)
    if not sum(data.datamodule.class_counts().get(PARITY_SPLIT, {}).values()):
        raise DataError(
            f"ckpt_path={config.ckpt_path}: its {PARITY_SPLIT} split has no images, and the exported model's "
            "parity check runs on them: give data with a val split (data.root=...)"
        )
    model, card = inference_model(checkpoint, config.ckpt_path)
    del checkpoint
    model = model.float().eval()
    backbone = card.backbone_label

    output_dir.mkdir(parents=True, exist_ok=True)
    model_file = output_dir / MODEL_FILES[config.format]
    example = torch.zeros(EXAMPLE_BATCH, 3, card.prep.crop_size, card.prep.crop_size)
    log.info("Exporting %s (backbone %s) as %s", config.ckpt_path, backbone, config.format)
    if config.format == "onnx":
        export_onnx(model, example, model_file, config.opset, backbone)
    else:
        export_torchscript(model, example, model_file, backbone)

    card = replace(
        card,
        format=config.format,
        file=model_file.name,
        opset=config.opset if config.format == "onnx" else None,
        versions=versions(config.format),
    )
    card_file = card.write(output_dir)
    parity_file = output_dir / PARITY_NAME
    report = checked_parity(model, card, model_file, data.datamodule, config, parity_file, data.source)
    log.info(
        "Parity on %d %s images (batch sizes %s): max |logit difference| %.3g <= parity_atol=%g, the same "
        "top-1 class on every image",
        report["images"],
        PARITY_SPLIT,
        ", ".join(map(str, report["batch_sizes"])),
        report["max_abs_diff"],
        config.parity_atol,
    )
    log.info("Exported %s (with %s and %s beside it)", model_file, card_file.name, parity_file.name)
    return ExportResult(model_file, card_file, parity_file, report)


def refuse_preprocessing_keys(tool: str = "export") -> None:
    """The exported model takes the checkpoint's preprocessing (its model.json says which): checking it on
    images preprocessed otherwise would check something the card does not describe."""
    for key in sorted(typed_data_keys(command_line_overrides()) & set(PREPROCESSING_KEYS)):
        raise ConfigError(
            f"data.{key} is not read by {tool}: the exported model takes the checkpoint's own "
            f"preprocessing ({CARD_NAME} records it). Remove it"
        )


def _check_opset(config: ExportConfig) -> None:
    if config.format != "onnx":
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if config.opset > newest:
        raise ConfigError(
            f"opset={config.opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}"
        )


def checked_parity(
    model: InferenceModel,
    card: ModelCard,
    model_file: Path,
    datamodule: Any,
    checks: ExportConfig,
    report_file: Path | None = None,
    split_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The parity report of `model_file` (written to `report_file` when given). A file that fails the
    check, or whose check does not finish, is renamed <file>.failed and the run stops: it is not known
    to give the checkpoint's answers. export and optimize method=quantize (its fp32 reference) use it."""
    failed_file = model_file.with_name(model_file.name + FAILED_SUFFIX)
    try:
        report = run_parity(model, card, model_file, datamodule, checks)
        if report_file is not None:
            write_json(report_file, {**report, "split_source": split_source})
    except BaseException:  # the check did not finish: the file is not known to be right
        os.replace(model_file, failed_file)
        raise
    if not report["passed"]:
        os.replace(model_file, failed_file)
        raise ConfigError(
            f"parity check failed: {model_file.name} of ckpt_path={checks.ckpt_path} does not give the "
            f"checkpoint's logits on its {PARITY_SPLIT} images ({report['reason']}); renamed to {failed_file}"
            + (f" (report: {report_file})" if report_file is not None else "")
        )
    return report


# --- the exporters ------------------------------------------------------------------------------------------


def _export_failure(backbone: str, form: str, error: BaseException) -> ConfigError:
    """The exporter's failure in one line: its first line, and its cause's (the exporter wraps it)."""
    lines = [f"{type(error).__name__}: {first_line(error)}"]
    if error.__cause__ is not None:
        lines.append(f"{type(error.__cause__).__name__}: {first_line(error.__cause__)}")
    return ConfigError(f"backbone {backbone} cannot be exported to format={form} ({'; '.join(lines)})")


def export_onnx(model: InferenceModel, example: torch.Tensor, path: Path, opset: int, backbone: str) -> None:
    """torch.onnx's dynamo exporter (torch.export, then ONNX; the TorchScript-based one is deprecated):
    input "images" with a dynamic batch dimension, output "logits", one file (weights inside) below 2 GiB."""
    # below 18 the exporter converts down, warning at length (with a traceback) when it cannot: the
    # opset check after the export says it in one line
    level = logging.ERROR if opset < ONNX_FIRST_OPSET else logging.WARNING
    try:
        with warnings.catch_warnings(), quiet_loggers(EXPORTER_LOGGERS, level):
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},  # InferenceModel.forward(images)
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types (torch.export, onnxscript, onnx)
        raise _export_failure(backbone, "onnx", error) from error
    proto = program.model_proto
    made = {entry.domain: entry.version for entry in proto.opset_import}.get("")
    if made != opset:  # below 18 the exporter converts, and keeps 18 when that fails (with a warning only)
        raise ConfigError(
            f"opset={opset}: backbone {backbone} could not be converted to ONNX opset {opset} (the exporter "
            f"made opset {made}); choose opset={ONNX_FIRST_OPSET} or above, which ONNX Runtime 1.14+ runs"
        )
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if size < PROTOBUF_LIMIT:
        data = proto.SerializeToString()
        atomic_write(path, lambda f: f.write(data))
    else:  # over protobuf's limit: the weights in <file>.data, which must stay beside the file
        log.warning(
            "%.1f GB of weights: they go to %s.data, which must stay beside %s", size / 1e9, path, path.name
        )
        program.save(str(path), external_data=True)


def export_torchscript(model: InferenceModel, example: torch.Tensor, path: Path, backbone: str) -> None:
    """torch.jit.trace, not torch.jit.script: scripting compiles each module's Python source, which many
    timm and torchvision models do not support (annotations, *args, Python-object control flow); tracing
    records the tensor operations the eval-mode network runs, which for these feed-forward classifiers is
    the whole computation. What a trace can get wrong (a Python value frozen at the example's, such as
    its batch size) is what the parity check, at a batch above one and at one, catches."""
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", DEPRECATED_JIT, FutureWarning)
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as error:
        raise _export_failure(backbone, "torchscript", error) from error
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        log.info(
            "Tracing warned %d time(s), e.g. %s (the parity check tests the traced model)",
            len(tracer),
            first_line(Warning(str(tracer[0].message))),
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", DEPRECATED_JIT, FutureWarning)
        atomic_write(path, lambda f: torch.jit.save(traced, f))


def versions(form: str) -> dict[str, str]:
    """What made the file, and (ONNX) what checked it."""
    import transferlab

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transferlab": transferlab.__version__,
    }
    if form == "onnx":
        import onnx
        import onnxruntime

        found.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return found


# --- the parity check -------------------------------------------------------------------------------------


def val_images(loader: Iterable[Any], limit: int | None, size: int = PARITY_BATCH) -> Iterator[torch.Tensor]:
    """The loader's images in its order, at most `limit` (None: all), in batches of `size` (the last may be
    smaller): real images at a batch size of the check's choosing, whatever the checkpoint's batch_size."""
    pending: list[torch.Tensor] = []
    left = math.inf if limit is None else limit
    for batch in loader:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        images = images[: int(min(left, len(images)))]
        left -= len(images)
        pending.append(images)
        while sum(len(p) for p in pending) >= size:
            merged = torch.cat(pending)
            yield merged[:size]
            pending = [merged[size:]]
        if left <= 0:
            break
    rest = [p for p in pending if len(p)]
    if rest:
        yield torch.cat(rest)


def run_parity(
    model: InferenceModel, card: ModelCard, model_file: Path, datamodule: Any, config: ExportConfig
) -> dict[str, Any]:
    """The exported file, loaded back as predict loads it, against the checkpoint's model: parity.json."""
    reference = TorchPredictor(model, card, torch.device("cpu"), f"ckpt_path={config.ckpt_path}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", DEPRECATED_JIT, FutureWarning)
            exported = open_exported(model_file, device="cpu")
    except ConfigError as error:
        report = parity_report(
            0, 0, math.nan, set(), config.parity_atol, f"it cannot be loaded back: {error}"
        )
    else:
        batches = val_images(datamodule.split_dataloader(PARITY_SPLIT), config.parity_images)
        report = check_parity(reference, exported, batches, config.parity_atol)
    report.update(
        format=config.format,
        file=model_file.name,
        split=PARITY_SPLIT,
        reference="the checkpoint's PyTorch InferenceModel, fp32, CPU",
    )
    return report


def check_parity(
    reference: Predictor, exported: Predictor, batches: Iterable[torch.Tensor], atol: float
) -> dict[str, Any]:
    """`exported` against `reference` on every batch, and on the first image alone (a batch of one); with a
    single image in all, on it twice too (a batch of two). Returns the report parity.json holds."""
    images, disagreements, max_diff, sizes = 0, 0, 0.0, set()
    others_disagree = False  # the extra batches (of one, of two) gave another top-1 class

    def compare(x: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
        sizes.add(len(x))
        try:
            got = exported(x.contiguous()).float()
        except Exception as error:  # ONNX Runtime raises its own types
            raise _Mismatch(
                f"it failed on a batch of {len(x)}: {type(error).__name__}: {first_line(error)}"
            ) from error
        if tuple(got.shape) != tuple(expected.shape):
            raise _Mismatch(
                f"a batch of {len(x)} gave logits of shape {tuple(got.shape)}, not {tuple(expected.shape)}"
            )
        return (got - expected).abs().max().item(), int((got.argmax(dim=1) != expected.argmax(dim=1)).sum())

    first: torch.Tensor | None = None
    reason = None
    try:
        for x in batches:
            x = x.float()
            expected = reference(x)
            diff, wrong = compare(x, expected)
            images, max_diff, disagreements = images + len(x), _max(max_diff, diff), disagreements + wrong
            if first is None:  # the dynamic batch: one image alone
                first = x[:1]
                diff, wrong = compare(first, expected[:1])
                max_diff, others_disagree = _max(max_diff, diff), others_disagree or wrong > 0
        if first is None:
            raise DataError(f"the {PARITY_SPLIT} split gave no image for the parity check")
        if max(sizes) == 1:  # one image in all: a batch of two of it
            pair = torch.cat([first, first])
            diff, wrong = compare(pair, reference(pair))
            max_diff, others_disagree = _max(max_diff, diff), others_disagree or wrong > 0
    except _Mismatch as mismatch:
        reason = str(mismatch)
    if reason is None and not max_diff <= atol:  # (NaN fails too)
        reason = f"max |logit difference| {max_diff:.3g} > parity_atol={atol:g}"
    if reason is None and (disagreements or others_disagree):
        where = f"{disagreements} of {images} images" if disagreements else "an image in a batch of its own"
        reason = f"the top-1 class differs on {where}"
    return parity_report(images, disagreements, max_diff, sizes, atol, reason)


def parity_report(
    images: int, disagreements: int, max_diff: float, sizes: set[int], atol: float, reason: str | None
) -> dict[str, Any]:
    return {
        "images": images,
        "max_abs_diff": max_diff if math.isfinite(max_diff) else None,  # None: not measured, or NaN
        "top1_agreement": (images - disagreements) / images if images else None,
        "top1_disagreements": disagreements,
        "atol": atol,
        "passed": reason is None,
        "reason": reason,
        "batch_sizes": sorted(sizes),
    }


class _Mismatch(Exception):
    """The exported model gave no logits comparable with the checkpoint's: its failure, or a wrong shape."""


def _max(current: float, diff: float) -> float:
    """The larger; NaN once either is NaN (a NaN logit fails the check)."""
    return diff if math.isnan(diff) or diff > current else current
