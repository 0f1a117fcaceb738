"""CPU latency as optimize reports it (and benchmarks/int8_runtimes.py measures other runtimes with):
warm-up runs first, then the median of timed runs, at batch 1 and 32; two models compared in rounds."""

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


RoundMedians = dict[str, dict[int, list[float]]]  # per model and batch size: each round's median ms


def medians_in_rounds(
    open_runner: Callable[[str], Runner], names: Sequence[str], images: Any, runs: int, rounds: int = 1
) -> RoundMedians:
    """Median ms of each model at each batch size (`images[:batch]`), per round. Each model is timed with
    its runner the only one open: a runtime's pool threads spin for a while after a run, so a second live
    session takes a core from the one being timed (measured with ONNX Runtime on Lite0, 2 cores, batch 32:
    fp32 149 and int8 83 ms taking turns run by run, 125 and 58 ms alone). A round is blocks in the order
    A B B A, `runs` per model (rounded up to even), so that a drift of the machine's load falls on both
    alike; a step in it (a virtual machine's neighbour starting work) spoils the round it falls in, which
    the median over rounds then leaves out (`median_over_rounds`, `speedup_over_rounds`)."""
    runs_per_block = -(-runs // 2)
    medians: RoundMedians = {name: {b: [] for b in LATENCY_BATCHES} for name in names}
    for _ in range(rounds):
        times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in LATENCY_BATCHES} for name in names}
        for name in [*names, *reversed(names)]:
            run = open_runner(name)
            for batch in LATENCY_BATCHES:
                times[name][batch] += timed_ms(run, images[:batch], runs_per_block)
            del run  # its session and threads end before the next block's open
        for name, per_batch in times.items():
            for batch, ms in per_batch.items():
                medians[name][batch].append(statistics.median(ms))
    return medians


def median_over_rounds(medians: RoundMedians) -> dict[str, dict[int, float]]:
    """Each model's latency: the median of its rounds' medians."""
    return {
        name: {b: statistics.median(ms) for b, ms in per_batch.items()} for name, per_batch in medians.items()
    }


def round_speedups(medians: RoundMedians, slow: str, fast: str) -> dict[int, list[float]]:
    """`slow`'s time over `fast`'s, round by round: both measured within the same few seconds."""
    return {
        b: [s / f for s, f in zip(medians[slow][b], medians[fast][b], strict=True)] for b in LATENCY_BATCHES
    }


def speedup_over_rounds(medians: RoundMedians, slow: str, fast: str) -> dict[int, float]:
    """The median of the rounds' speed-ups (`round_speedups`)."""
    return {b: statistics.median(ratios) for b, ratios in round_speedups(medians, slow, fast).items()}
