"""CPU latency as optimize reports it (and benchmarks/int8_runtimes.py measures other runtimes with):
warm-up runs first, then the median of timed runs, at batch 1 and 32."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

LATENCY_BATCHES = (1, 32)
WARMUP_RUNS = 3  # untimed runs first: the first ones allocate and pick kernels

Runner = Callable[[Any], Any]  # one forward pass of a batch


def timed_ms(run: Runner, batch: Any, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls of run(batch), after WARMUP_RUNS untimed ones."""
    for _ in range(WARMUP_RUNS):
        run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(batch)
        times.append(1000 * (time.perf_counter() - start))
    return times


def medians_in_blocks(
    open_runner: Callable[[str], Runner], names: Sequence[str], images: Any, runs: int
) -> dict:
    """Median ms per model and batch size (`images[:batch]`), each model timed with its runner the only one
    open: a runtime's pool threads spin for a while after a run, so a second live session takes a core
    from the one being timed (measured with ONNX Runtime on Lite0, 2 cores, batch 32: fp32 149 and int8
    83 ms taking turns run by run, 125 and 58 ms alone). Blocks of runs in the order A B B A, so that a
    drift of the machine's load falls on both alike; `runs` per model, rounded up to even."""
    runs_per_block = -(-runs // 2)
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in LATENCY_BATCHES} for name in names}
    for name in [*names, *reversed(names)]:
        run = open_runner(name)
        for batch in LATENCY_BATCHES:
            times[name][batch] += timed_ms(run, images[:batch], runs_per_block)
        del run  # its session and threads end before the next block's open
    return {
        name: {b: statistics.median(t) for b, t in per_batch.items()} for name, per_batch in times.items()
    }
