"""Watch a training job's host memory from outside: every rank's resident set twice a second, labelled with the
phase that rank was in (from ``resources.json``'s ``phase_starts``).

``training.resources`` measures each phase's exact peak inside every rank (``VmHWM``); this is the independent view
a test or a benchmark takes of the same run: it samples ``VmRSS`` of the job's process tree from /proc (a sample
can miss a short peak, never invent one) and joins each sample to its rank (``resources.json``'s ``pids``) and
phase by time.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (one scan of /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


@dataclass
class RssSampler:
    """Samples (unix time, pid, resident bytes) of ``root`` and its descendants every ``interval`` seconds, in a
    thread, between ``start`` and ``stop`` (or as a context manager)."""

    root: int
    interval: float = 0.5
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for pid in _descendants(self.root):
                rss = _rss(pid)
                if rss is not None:
                    self.samples.append((now, pid, rss))
            self._stop.wait(self.interval)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def phase_of(starts: list[list], when: float) -> str | None:
    """The phase a rank was in at ``when`` (``starts``: its [[phase, unix time], ..., ["end", unix time]] in
    order), None before the first and after the end (the process exiting after its report)."""
    current = None
    for phase, began in starts:
        if began > when:
            break
        current = phase
    return None if current == "end" else current


def sampled_phase_peaks(samples: list[tuple[float, int, int]], report: dict) -> dict[str, list[int]]:
    """The largest sampled resident set per phase and rank (0 where a rank had no sample in that phase), from the
    samples of the ranks' pids in ``report`` (``resources.json``)."""
    ranks = {pid: r for r, pid in enumerate(report["pids"])}
    out: dict[str, list[int]] = {}
    for when, pid, rss in samples:
        rank = ranks.get(pid)
        if rank is None:
            continue
        phase = phase_of(report["phase_starts"][rank], when)
        if phase is not None:
            row = out.setdefault(phase, [0] * len(ranks))
            row[rank] = max(row[rank], rss)
    return out


@dataclass
class WatchedRun:
    """A finished job: its exit code, output and the resident-set samples of its process tree."""

    returncode: int
    stdout: str
    stderr: str
    samples: list[tuple[float, int, int]]


def run_watched(cmd: list[str], cwd: str | os.PathLike, env: dict[str, str], timeout: float,
                interval: float = 0.5) -> WatchedRun:
    """Run ``cmd`` to its end, sampling its process tree's resident sets every ``interval`` seconds."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RssSampler(proc.pid, interval) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return WatchedRun(proc.returncode, out, err, sampler.samples)
