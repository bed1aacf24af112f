"""Measurement method shared by the suites: interleaved rounds, robust statistics, peak memory.

On a shared machine the time of one run swings by several times, so a number is only meaningful relative to a
baseline measured right beside it: every round runs every candidate once (the order rotates from round to round,
so no candidate always follows the same one), the warm-up rounds are dropped, and ratios are taken per round
(paired with the baseline of the same round) before the median is taken.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Stats:
    min: float
    median: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repetitions are."""
        return (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict:
        return {"min": self.min, "median": self.median, "max": self.max, "n": self.n, "spread": self.spread}


def stats(values: Sequence[float]) -> Stats:
    if not values:
        raise ValueError("no measurements")
    return Stats(min(values), statistics.median(values), max(values), len(values))


def interleaved(candidates: Sequence[str], run: Callable[[str], float], repeats: int, warmup: int = 1,
                on_round: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Per candidate, one measurement per counted round. ``run(name)`` returns the measurement (seconds).

    Round r runs the candidates starting at index r (rotated), so each one is measured at every position.
    """
    out: dict[str, list[float]] = {c: [] for c in candidates}
    total = warmup + repeats
    for r in range(total):
        order = [candidates[(r + k) % len(candidates)] for k in range(len(candidates))]
        for name in order:
            value = run(name)
            if r >= warmup:
                out[name].append(value)
        if on_round is not None:
            on_round(r + 1, total)
    return out


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, Stats]:
    """Per candidate: baseline time / candidate time, per round (>1: faster than the baseline)."""
    base = times[baseline]
    return {name: stats([b / v for b, v in zip(base, values, strict=True) if v > 0]) for name, values in times.items()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator peak on a GPU, resident set size (sampled every
    2 ms in a thread) on the CPU. ``bytes`` after the ``with`` block."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self._peak, _rss_bytes()) - self._base


def seconds(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn`` (synchronized on CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
