"""What a run costs, measured: step time, tokens per second, the teacher's load throughput, and peak host and GPU
memory of every rank, over the whole run and per phase.

``mark_baseline`` records the process's host memory high-water mark before any model is loaded (after imports, the
process group and FSDP2's one-time start-up, ``parallel.warm_up``). The stages name the phase they are in with
``set_phase`` (``PHASES``: loading, initial evaluation, forward/backward, optimizer step, EMA, checkpoint, final
evaluation, export); ``write_report`` gathers every rank's numbers at the end of a stage and rank 0 writes
``resources.json`` in the output folder:

``{"world_size", "pids": [per rank], "step_time_s" (median over the timed steps), "tokens_per_step",
"tokens_per_s", "steps_timed", "host_peak_bytes": [per rank], "host_baseline_bytes": [per rank], "gpu_peak_bytes": [per rank] or null,
"phase_peak_bytes": {phase: [per rank]}, "phase_starts": [per rank: [[phase, unix time], ..., ["end", time]]],
"teacher_load": {"bytes", "seconds", "read_seconds", "bytes_per_s", "read_bytes_per_s"}}``: each a list per rank:
the teacher's bytes read from its files, the seconds of its whole load (building, sharding, reading, converting)
and of the reads alone, and bytes per second of each.

Host memory is Linux's ``VmHWM`` (peak resident set, file-backed pages included), else ``ru_maxrss``. A phase's peak
is exact and costs two small /proc accesses per change: entering a phase reads ``VmHWM`` (the peak of the phase that
ends) and resets it to the current resident set (``/proc/self/clear_refs``, Linux >= 4.0). Where it cannot be reset
each phase reports the peak of the run so far.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from comfyui_pare.safetensors_io import atomic_write_text

from .parallel import DistInfo

logger = logging.getLogger(__name__)

_baseline: int | None = None
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# The phases a stage passes through, in order (a phase may recur: training alternates its steps and checkpoints).
PHASES = ("load", "initial_eval", "forward_backward", "optimizer_step", "ema", "checkpoint", "final_eval", "export")


def host_peak_bytes() -> int:
    """This process's peak resident memory so far, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def return_freed_memory() -> None:
    """On glibc, serve every allocation of 128 KiB or more with mmap, so memory freed by FSDP2 (each gathered block,
    its all-gather buffers, each slice read from a checkpoint) goes back to the OS at once. By default glibc raises
    its mmap threshold (up to 32 MiB) after the first such free and keeps later ones in its heaps, where
    fragmentation held on to a teacher's worth of freed gathers on the CPU (measured on 2 ranks, 0.55 GB teacher:
    +0.7 GB over a few steps; with a 1 MiB threshold still +0.1 GB after one forward; with 128 KiB none)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mark_baseline() -> None:
    """Remember the peak so far as the baseline (call once, before loading models)."""
    global _baseline
    if _baseline is None:
        _baseline = host_peak_bytes()


@dataclass
class PhaseTracker:
    """Peak host memory per phase of this process (see the module docstring)."""

    peaks: dict[str, int] = field(default_factory=dict)
    starts: list[tuple[str, float]] = field(default_factory=list)
    current: str | None = None
    overall: int = 0  # the run's peak over every phase ended so far

    def enter(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
        if phase == self.current:
            return
        self.close()
        reset_peak()
        self.current = phase
        self.starts.append((phase, time.time()))

    def close(self) -> None:
        """End the current phase: its peak is the high-water mark since it began (``starts`` gets an ``"end"``)."""
        peak = host_peak_bytes()
        self.overall = max(self.overall, peak)
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
            self.starts.append(("end", time.time()))
        self.current = None


_phases = PhaseTracker()
_load = {"bytes": 0, "seconds": 0.0, "read_seconds": 0.0}


def start_run() -> None:
    """Forget the phases and loads of an earlier run in this process, and enter ``load``."""
    global _phases
    _phases = PhaseTracker()
    _load.update(bytes=0, seconds=0.0, read_seconds=0.0)
    set_phase("load")


def set_phase(phase: str) -> None:
    """This process is now in ``phase`` (one of ``PHASES``): the previous phase's peak is recorded."""
    _phases.enter(phase)


def record_load(num_bytes: int, seconds: float, read_seconds: float) -> None:
    """The teacher's load on this rank: bytes read from its files, the whole load's ``seconds`` (building,
    sharding, reading, converting) and the ``read_seconds`` of those spent reading (``resources.json``)."""
    _load["bytes"] += int(num_bytes)
    _load["seconds"] += float(seconds)
    _load["read_seconds"] += float(read_seconds)


def _gather(value: int, info: DistInfo) -> list[int]:
    if not info.distributed:
        return [value]
    t = torch.zeros(info.world_size, dtype=torch.int64, device=info.device)
    t[info.rank] = value
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def summarize_steps(durations: list[float], tokens_per_step: int) -> dict:
    """Median step time (the first step, with its warm-up, left out when there are others) and tokens/s."""
    timed = durations[1:] if len(durations) > 1 else durations
    step = statistics.median(timed) if timed else 0.0
    return {"steps_timed": len(timed), "step_time_s": step, "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / step if step > 0 else 0.0}


def _gather_objects(value, info: DistInfo) -> list:
    if not info.distributed:
        return [value]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def write_report(out_dir: str | Path, info: DistInfo, steps: dict) -> dict:
    """Gather every rank's memory peaks and load throughput (a collective: every rank calls it); rank 0 writes
    ``resources.json``. Ends the current phase."""
    _phases.close()
    gpu = torch.cuda.max_memory_allocated(info.device) if info.device.type == "cuda" else None
    times = _gather_objects((_load["seconds"], _load["read_seconds"]), info)
    seconds, read_seconds = [s for s, _ in times], [r for _, r in times]
    loaded = _gather(_load["bytes"], info)
    report = {"world_size": info.world_size, **steps, "pids": _gather(os.getpid(), info),
              "host_peak_bytes": _gather(max(_phases.overall, host_peak_bytes()), info),
              "host_baseline_bytes": _gather(_baseline or 0, info),
              "gpu_peak_bytes": None if gpu is None else _gather(gpu, info),
              "phase_peak_bytes": {p: _gather(_phases.peaks.get(p, 0), info) for p in PHASES},
              "phase_starts": _gather_objects(_phases.starts, info),
              "teacher_load": {"bytes": loaded, "seconds": seconds, "read_seconds": read_seconds,
                               "bytes_per_s": [b / s if s > 0 else 0.0 for b, s in zip(loaded, seconds)],
                               "read_bytes_per_s": [b / s if s > 0 else 0.0 for b, s in zip(loaded, read_seconds)]}}
    if info.is_main:
        atomic_write_text(Path(out_dir) / "resources.json", json.dumps(report, indent=1))
        logger.info("%.3f s/step, %.0f tokens/s; host peak per rank %s GB; teacher read at %s MB/s per rank",
                    report["step_time_s"], report["tokens_per_s"],
                    [round(b / 1e9, 2) for b in report["host_peak_bytes"]],
                    [round(b / 1e6) for b in report["teacher_load"]["bytes_per_s"]])
    return report
