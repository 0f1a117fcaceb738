"""int8 against fp32 on the CPU under three runtimes, for one `optimize method=quantize` output
(experiments/compression/README.md, "Other int8 routes"):

    python benchmarks/int8_runtimes.py outputs/compression/<run> --out experiments/compression/int8_runtimes.json

- ONNX Runtime (what `optimize` ships): its model.onnx and model.int8.onnx;
- OpenVINO (`pip install openvino`), the same two files: the QDQ int8 model runs on its own int8 kernels;
- PyTorch's own route (`pip install torchao`): the source checkpoint's model through PT2E with torchao's
  X86InductorQuantizer (calibrated on random inputs: latency only, no accuracy), against the same model
  in fp32, both compiled by inductor with freezing.

Each model is timed with nothing else of its runtime alive (idle threads that spin can take a core from
the next), in blocks fp32, int8, int8, fp32 with warm-up runs first; the median of `--runs` per model,
at batch 1 and 32, with `--threads` threads for every runtime.
A route whose package is missing is reported as skipped, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.inference.model import ModelCard, load_inference_model

BATCHES = (1, 32)
MODELS = ("fp32", "int8")
WARMUP = 3


def timed_runs(run: Callable[[np.ndarray], Any], images: np.ndarray, runs: int) -> list[float]:
    for _ in range(WARMUP):
        run(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(images)
        times.append(1000 * (time.perf_counter() - start))
    return times


def in_blocks(measure: Callable[[str, int], list[float]]) -> dict[str, Any]:
    """Median ms per model and batch over blocks in the order fp32, int8, int8, fp32: a drift of the
    machine (or a cold first block) falls on both alike."""
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in MODELS}
    for name in [*MODELS, *reversed(MODELS)]:
        for batch in BATCHES:
            times[name][batch] += measure(name, batch)
    found: dict[str, Any] = {
        name: {b: statistics.median(t) for b, t in per.items()} for name, per in times.items()
    }
    found["speedup"] = {b: found["fp32"][b] / found["int8"][b] for b in BATCHES}
    return found


def onnxruntime_route(files: dict[str, Path], size: int, threads: int, runs: int) -> dict[str, Any]:
    import onnxruntime

    def measure(name: str, batch: int) -> list[float]:
        # a session alive only in here: its threads, which spin after a run, end with it
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(files[name]), options, providers=["CPUExecutionProvider"])
        feed_name = session.get_inputs()[0].name
        return timed_runs(lambda x: session.run(None, {feed_name: x}), random_images(batch, size), runs)

    return {"version": onnxruntime.__version__, **in_blocks(measure)}


def openvino_route(files: dict[str, Path], size: int, threads: int, runs: int) -> dict[str, Any]:
    import openvino

    def measure(name: str, batch: int) -> list[float]:
        core = openvino.Core()
        model = core.read_model(str(files[name]))
        model.reshape([batch, 3, size, size])
        settings: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            settings["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", settings)
        request = compiled.create_infer_request()
        return timed_runs(lambda x: request.infer({0: x}), random_images(batch, size), runs)

    return {"version": openvino.__version__, **in_blocks(measure)}


def pt2e_route(card: ModelCard, size: int, runs: int) -> dict[str, Any]:
    import torch._inductor.config as inductor_config
    import torchao
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    inductor_config.freezing = True  # weights become constants: what lets inductor fold the int8 weights
    model, _ = load_inference_model(card.source_checkpoint["path"])
    model = model.float().eval()
    batch_dim = {"images": {0: torch.export.Dim("batch", min=1, max=256)}}
    exported = torch.export.export(model, (torch.randn(2, 3, size, size),), dynamic_shapes=batch_dim)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, 3, size, size))
        models = {"fp32": torch.compile(model), "int8": torch.compile(convert_pt2e(prepared))}

        def measure(name: str, batch: int) -> list[float]:
            return timed_runs(lambda x: models[name](torch.from_numpy(x)), random_images(batch, size), runs)

        found = in_blocks(measure)
    return {"version": torchao.__version__, "torch": torch.__version__, **found}


def random_images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="an `optimize method=quantize` run directory")
    parser.add_argument("--threads", type=int, default=0, help="threads per runtime; 0 = each one's default")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    files = {"fp32": args.run_dir / "model.onnx", "int8": args.run_dir / "model.int8.onnx"}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise SystemExit(
            f"{', '.join(missing)}: not found; run `optimize method=quantize` into {args.run_dir}"
        )
    card = ModelCard.read(files["int8"])
    size = card.prep.crop_size
    if args.threads:
        torch.set_num_threads(args.threads)
    block_runs = -(-args.runs // 2)  # two blocks per model
    routes: dict[str, Callable[[], dict[str, Any]]] = {
        "onnxruntime": lambda: onnxruntime_route(files, size, args.threads, block_runs),
        "openvino": lambda: openvino_route(files, size, args.threads, block_runs),
        "pt2e_inductor": lambda: pt2e_route(card, size, block_runs),
    }
    report: dict[str, Any] = {
        "run_dir": str(args.run_dir),
        "image_size": size,
        "threads": args.threads or "each runtime's default",
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
    }
    for name, measure in routes.items():
        try:
            report[name] = measure()
        except ImportError as error:
            report[name] = {"skipped": f"{error.name} is not installed"}
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
