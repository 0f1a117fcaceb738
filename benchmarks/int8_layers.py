"""Where ONNX Runtime's int8 time goes, by kind of layer, and what keeping some kinds in fp32 does
(experiments/compression/README.md, "Batch 1 on two cores"):

    python benchmarks/int8_layers.py outputs/compression/<optimize run> --batch 1 --out experiments/compression/int8_layers.json

1. Kernel time per run of the run's model.onnx and model.int8.onnx (ONNX Runtime's profiler), summed by
   kind: 1x1 convolutions, depthwise convolutions (group > 1), other convolutions (the stem), the rest.
2. Variants quantized from the same fp32 file by `optimize`'s own quantize_file (its default settings:
   QDQ, per-channel int8 weights, uint8 activations) but with some kinds left in fp32: the depthwise
   convolutions, the stem, both. Calibrated on random images: latency only, no accuracy.
   Each model timed alone, blocks A B ... B A, median of `--runs` (compress.timing).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.compress.quantize import onnxruntime_runner, quantize_file
from transferlab.compress.timing import median_over_rounds, medians_in_rounds
from transferlab.config.schema import QuantizeConfig
from transferlab.inference.model import ModelCard


def layer_kinds(model_file: Path) -> dict[str, str]:
    """Node name -> kind, for the nodes of the graph as ONNX Runtime optimised it."""
    import onnx

    kinds = {}
    for node in onnx.load(str(model_file), load_external_data=False).graph.node:
        attributes = {a.name: a for a in node.attribute}
        if node.op_type not in ("Conv", "QLinearConv"):
            kinds[node.name] = node.op_type
        elif "group" in attributes and attributes["group"].i > 1:
            kinds[node.name] = "depthwise conv"
        elif "kernel_shape" in attributes and list(attributes["kernel_shape"].ints) == [1, 1]:
            kinds[node.name] = "1x1 conv"
        else:
            kinds[node.name] = "other conv"
    return kinds


def kernel_ms_by_kind(model_file: Path, batch: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    import onnxruntime

    with tempfile.TemporaryDirectory() as scratch:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = f"{scratch}/profile"
        options.optimized_model_filepath = f"{scratch}/optimized.onnx"
        session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        kinds = layer_kinds(Path(f"{scratch}/optimized.onnx"))
    totals: dict[str, float] = collections.defaultdict(float)
    suffix = "_kernel_time"
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith(suffix):
            totals[kinds.get(event["name"][: -len(suffix)], event["args"]["op_name"])] += event["dur"]
    ms = {kind: total / 1000 / runs for kind, total in totals.items()}
    return dict(sorted(ms.items(), key=lambda item: -item[1]))


def quantize_leaving_fp32(fp32_file: Path, out: Path, leave: set[str], images: np.ndarray) -> None:
    """`optimize`'s own quantization (compress.quantize.quantize_file, its default settings) with the
    layers of the kinds in `leave` kept in fp32, calibrated on two batches of `images`."""
    card = ModelCard.read(fp32_file)
    quantize_file(
        fp32_file,
        out,
        [images[:8], images[8:16]],
        QuantizeConfig(),
        card,
        kept_fp32=lambda prepared: [name for name, kind in layer_kinds(prepared).items() if kind in leave],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="an `optimize method=quantize` run directory")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the profile")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = ONNX Runtime's default")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fp32, int8 = args.run_dir / "model.onnx", args.run_dir / "model.int8.onnx"
    size = ModelCard.read(int8).prep.crop_size
    images = np.random.default_rng(0).random((32, 3, size, size), dtype=np.float32)
    report: dict[str, Any] = {"batch": args.batch, "threads": args.threads}
    report["kernel_ms"] = {
        name: kernel_ms_by_kind(path, images[: args.batch], args.threads, args.runs)
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    print(json.dumps(report["kernel_ms"], indent=1))
    variants = {"depthwise fp32": {"depthwise conv"}, "stem fp32": {"other conv"}}
    variants["depthwise and stem fp32"] = set().union(*variants.values())
    with tempfile.TemporaryDirectory() as scratch:
        files = {"fp32": fp32, "int8": int8}
        for name, leave in variants.items():
            files[name] = Path(scratch) / f"{name.replace(' ', '_')}.onnx"
            quantize_leaving_fp32(fp32, files[name], leave, images)
        medians = medians_in_rounds(
            lambda name: onnxruntime_runner(files[name], args.threads), list(files), images, args.runs
        )
        report["latency_ms"] = median_over_rounds(medians)
    print(json.dumps(report["latency_ms"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
