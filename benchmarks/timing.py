"""GPU timing the way DESIGN.md measures the anchors, so our numbers compare with theirs.

GPU time per call: several input sets rotated past L2 (>200 MB in all), the GPU held busy
with ``torch.cuda._sleep`` while the CPU queues a batch of calls, CUDA events around the
batch, median over 5 batches. Host time per call: wall time to queue the same calls,
divided by their number (the GPU still busy, so nothing waits on it).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

ROTATION_BYTES = 256 * 2**20


def num_input_sets(bytes_per_set: int, limit: int = 64) -> int:
    """How many copies of the inputs to rotate so that L2 (50 MB) cannot serve them."""
    return max(2, min(limit, -(-ROTATION_BYTES // max(1, bytes_per_set))))


def time_calls(calls: Sequence[Callable[[], object]], *, batch: int = 40, repeats: int = 5):
    """(median GPU ms per call, median host us per call) of cycling through `calls`."""
    for fn in calls[: min(len(calls), 3)]:  # warm-up: JIT, cuBLAS handles, allocator
        fn()
    torch.cuda.synchronize()
    gpu_ms, host_us = [], []
    sleep_cycles = 2_000_000
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        start.record()
        t0 = time.perf_counter()
        for i in range(batch):
            calls[i % len(calls)]()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        queue_s = t1 - t0
        # The sleep must outlast the queueing, or host gaps leak into the GPU time: grow it
        # (at up to 2 GHz, the H100's boost clock) and drop this batch if it did not.
        if queue_s * 2.0e9 * 1.3 > sleep_cycles:
            sleep_cycles = int(queue_s * 2.0e9 * 2)
            continue
        gpu_ms.append(start.elapsed_time(end) / batch)
        host_us.append(queue_s / batch * 1e6)
    if not gpu_ms:
        raise RuntimeError("could not keep the GPU busy while queueing; host too slow?")
    return statistics.median(gpu_ms), statistics.median(host_us)


def paired_ratio(calls_a: Sequence[Callable[[], object]], calls_b: Sequence[Callable[[], object]],
                 *, rounds: int = 7) -> float:
    """GPU time of ``calls_a`` over that of ``calls_b``: the median over ``rounds`` of the two
    measured back to back (the order alternating), so clock drift between separate
    measurements of two paths that launch the same kernels does not read as a difference."""
    ratios = []
    for i in range(rounds):
        first, second = (calls_a, calls_b) if i % 2 == 0 else (calls_b, calls_a)
        t_first, t_second = time_calls(first, repeats=3)[0], time_calls(second, repeats=3)[0]
        t_a, t_b = (t_first, t_second) if i % 2 == 0 else (t_second, t_first)
        ratios.append(t_a / t_b)
    return statistics.median(ratios)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph; the returned call replays it. For baselines that
    are loops of many small launches (a cuBLAS call per expert): replaying the graph times
    the GPU's work, not the host's queueing of each launch."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture: cuBLAS handles and workspaces
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graphed_or_none(label: str, name: str, calls: Sequence[Callable[[], object]]):
    """``graphed`` of every call, or None (the reason printed) where capture fails."""
    try:
        return [graphed(fn) for fn in calls]
    except RuntimeError as exc:
        print(f"{label}: {name} could not be captured in a CUDA graph ({str(exc)[:120]})", flush=True)
        return None


def time_candidates(label: str, candidates: dict, flops: int, *, batch: int = 10) -> dict:
    """TFLOP/s of each named list of calls; a candidate that fails (a baseline this torch
    lacks, say) is reported and left out rather than ending the run."""
    result = {}
    for name, calls in candidates.items():
        try:
            ms, _ = time_calls(calls, batch=batch)
            result[name] = flops / (ms * 1e-3) / 1e12
        except Exception as exc:
            print(f"{label}: {name} failed ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
    return result
