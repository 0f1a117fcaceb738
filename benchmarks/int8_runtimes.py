"""int8 against fp32 on the CPU under four runtimes and five routes, for one `optimize method=quantize` output
(experiments/compression/README.md, "Other int8 routes"):

    python benchmarks/int8_runtimes.py outputs/compression/<run> --out experiments/compression/int8_runtimes.json

- ONNX Runtime (what `optimize` ships): its model.onnx and model.int8.onnx;
- OpenVINO (`pip install openvino`), the same two files: the QDQ int8 model runs on its own int8 kernels;
- OpenVINO's own int8 (`pip install openvino nncf`): NNCF's post-training quantization of the fp32 file
  (calibrated on random inputs: latency only), against the same fp32 file;
- PyTorch's own route (`pip install torchao`): the source checkpoint's model through PT2E with torchao's
  X86InductorQuantizer (calibrated on random inputs: latency only, no accuracy), against the same model
  in fp32, both compiled by inductor with freezing;
- ExecuTorch with XNNPACK (`pip install executorch`): the same model through PT2E with XNNPACK's
  quantizer (per-channel symmetric int8, calibrated on random inputs: latency only), against the same
  model in fp32, both wholly delegated to XNNPACK, one program per batch size.

Each model is timed with nothing else of its runtime alive (idle threads that spin can take a core from
the next), in `--rounds` rounds of blocks fp32, int8, int8, fp32 with warm-up runs first, `--runs` per
model and round, at batch 1 and 32, with `--threads` threads for every runtime; a model's latency is the
median of its rounds' medians, the speed-up the median of the rounds' own (as `optimize` reports them).
A route whose package is missing is reported as skipped, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from transferlab.compress.quantize import onnxruntime_runner
from transferlab.compress.timing import (
    LATENCY_BATCHES,
    Runner,
    median_over_rounds,
    medians_in_rounds,
    round_speedups,
    speedup_over_rounds,
)
from transferlab.inference.model import ModelCard, load_inference_model

MODELS = ("fp32", "int8")
ROUTES = ("onnxruntime", "openvino", "openvino_nncf", "pt2e_inductor", "executorch_xnnpack")


class Timing(NamedTuple):
    runs: int  # per model, batch size and round
    rounds: int


def measured(open_runner: Callable[[str], Runner], images: np.ndarray, timing: Timing) -> dict[str, Any]:
    """Both models' latencies and the speed-up, as `optimize` measures them (`timing.medians_in_rounds`)."""
    medians = medians_in_rounds(open_runner, MODELS, images, timing.runs, timing.rounds)
    return {
        **median_over_rounds(medians),
        "speedup": speedup_over_rounds(medians, "fp32", "int8"),
        "speedup_rounds": round_speedups(medians, "fp32", "int8"),
    }


def onnxruntime_route(
    files: dict[str, Path], images: np.ndarray, threads: int, timing: Timing
) -> dict[str, Any]:
    import onnxruntime

    runner = lambda name: onnxruntime_runner(files[name], threads)  # noqa: E731
    return {"version": onnxruntime.__version__, **measured(runner, images, timing)}


def _openvino_medians(
    models: dict[str, Callable[[Any], Any]], images: np.ndarray, threads: int, timing: Timing
) -> dict[str, Any]:
    """OpenVINO's medians for models[name](core) -> a model (a fresh one per batch size: it is reshaped)."""
    import openvino

    def open_runner(name: str) -> Runner:
        core = openvino.Core()
        settings: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            settings["INFERENCE_NUM_THREADS"] = threads
        requests: dict[
            int, Any
        ] = {}  # one static-shape model per batch size, compiled at its first (warm-up) run

        def run(batch: np.ndarray) -> Any:
            if len(batch) not in requests:
                model = models[name](core)
                model.reshape(list(batch.shape))
                requests[len(batch)] = core.compile_model(model, "CPU", settings).create_infer_request()
            return requests[len(batch)].infer({0: batch})

        return run

    return {
        "version": openvino.__version__,
        **measured(open_runner, images, timing),
    }


def openvino_route(
    files: dict[str, Path], images: np.ndarray, threads: int, timing: Timing
) -> dict[str, Any]:
    readers = {name: (lambda core, path=path: core.read_model(str(path))) for name, path in files.items()}
    return _openvino_medians(readers, images, threads, timing)


def openvino_nncf_route(
    files: dict[str, Path], images: np.ndarray, threads: int, timing: Timing
) -> dict[str, Any]:
    """OpenVINO's own int8 route: NNCF's post-training quantization (its defaults) of the fp32 file,
    calibrated on the benchmark's random images (latency only), against the same fp32 file."""
    import nncf
    import openvino

    model = openvino.Core().read_model(str(files["fp32"]))
    model.reshape([1, *images.shape[1:]])
    samples = [images[i : i + 1] for i in range(len(images))]
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    models = {
        "fp32": lambda core: core.read_model(str(files["fp32"])),
        "int8": lambda core: quantized.clone(),
    }
    return {"nncf": nncf.__version__, **_openvino_medians(models, images, threads, timing)}


def pt2e_route(card: ModelCard, images: np.ndarray, timing: Timing) -> dict[str, Any]:
    import torch._inductor.config as inductor_config
    import torchao
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    inductor_config.freezing = True  # weights become constants: what lets inductor fold the int8 weights
    model, _ = load_inference_model(card.source_checkpoint["path"])
    model = model.float().eval()
    size = images.shape[-1]
    batch_dim = {"images": {0: torch.export.Dim("batch", min=1, max=256)}}
    exported = torch.export.export(model, (torch.randn(2, 3, size, size),), dynamic_shapes=batch_dim)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, 3, size, size))
        models = {"fp32": torch.compile(model), "int8": torch.compile(convert_pt2e(prepared))}
        found = measured(lambda name: lambda batch: models[name](torch.from_numpy(batch)), images, timing)
    return {"version": torchao.__version__, "torch": torch.__version__, **found}


def executorch_route(card: ModelCard, images: np.ndarray, threads: int, timing: Timing) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime
    from executorch.version import __version__ as executorch_version
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model, _ = load_inference_model(card.source_checkpoint["path"])
    model = model.float().eval()
    shape = images.shape[1:]
    batch_dim = {"images": {0: torch.export.Dim("batch", min=1, max=256)}}
    exported = torch.export.export(model, (torch.randn(8, *shape),), dynamic_shapes=batch_dim)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, *shape))
    sources = {"fp32": model, "int8": convert_pt2e(prepared)}
    programs = {  # .pte bytes per model and batch size: ExecuTorch runs static shapes
        (name, batch): to_edge_transform_and_lower(
            torch.export.export(source, (torch.randn(batch, *shape),)), partitioner=[XnnpackPartitioner()]
        )
        .to_executorch()
        .buffer
        for name, source in sources.items()
        for batch in LATENCY_BATCHES
    }
    if threads:
        portable_lib._unsafe_reset_threadpool(threads)
    runtime = Runtime.get()

    def open_runner(name: str) -> Runner:
        methods = {
            b: runtime.load_program(programs[(name, b)]).load_method("forward") for b in LATENCY_BATCHES
        }
        return lambda batch: methods[len(batch)].execute([torch.from_numpy(batch)])

    found = measured(open_runner, images, timing)
    return {
        "version": executorch_version,
        "threads_used": portable_lib._threadpool_get_thread_count(),
        **found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="an `optimize method=quantize` run directory")
    parser.add_argument("--threads", type=int, default=0, help="threads per runtime; 0 = each one's default")
    parser.add_argument("--runs", type=int, default=30, help="per model, batch size and round")
    parser.add_argument("--rounds", type=int, default=5, help="the speed-up is the median of the rounds' own")
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES), help="the routes to run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be at least 1")
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
    images = np.random.default_rng(0).standard_normal((max(LATENCY_BATCHES), 3, size, size), dtype=np.float32)
    timing = Timing(args.runs, args.rounds)
    routes: dict[str, Callable[[], dict[str, Any]]] = {
        "onnxruntime": lambda: onnxruntime_route(files, images, args.threads, timing),
        "openvino": lambda: openvino_route(files, images, args.threads, timing),
        "openvino_nncf": lambda: openvino_nncf_route(files, images, args.threads, timing),
        "pt2e_inductor": lambda: pt2e_route(card, images, timing),
        "executorch_xnnpack": lambda: executorch_route(card, images, args.threads, timing),
    }
    report: dict[str, Any] = {
        "run_dir": str(args.run_dir),
        "image_size": size,
        "threads": args.threads or "each runtime's default",
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
        "rounds": args.rounds,
    }
    for name in args.routes:
        measure = routes[name]
        try:
            report[name] = measure()
        except ImportError as error:
            report[name] = {"skipped": f"{error.name} is not installed"}
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
