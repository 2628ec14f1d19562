"""Run metrics: a JSONL file in the run folder, throughput and peak memory."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(peak GB, what was measured): CUDA's peak allocated memory, or on CPU the process's
    peak resident set (the closest CPU analogue; it includes the Python runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9, "cpu_max_rss"


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends one JSON object per line; on resume, drops the records after the checkpoint's
    step (a run cut off after its last checkpoint logged steps that will be run again)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Throughput:
    """Tokens per second over training time only (evaluation and checkpointing excluded).

    ``steady`` leaves out the first interval after (re)start, which pays for warm-up
    (allocator, kernel compiles, torch.compile), so short runs still give a fair figure.
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.intervals = 0
        self.steady_tokens, self.steady_time = 0, 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def lap(self) -> float:
        """Close the current interval (call after a host sync); returns its tokens/s."""
        dt = time.perf_counter() - self.t0
        rate = self.tokens / dt if dt > 0 else 0.0
        if self.intervals > 0:
            self.steady_tokens += self.tokens
            self.steady_time += dt
        self.intervals += 1
        self.restart()
        return rate

    def restart(self) -> None:
        """Start a new interval now (after eval or a checkpoint, whose time is not training)."""
        self.t0, self.tokens = time.perf_counter(), 0

    def steady(self) -> float | None:
        return self.steady_tokens / self.steady_time if self.steady_time > 0 else None
