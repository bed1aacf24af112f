"""Training-free static schedules from calibration's block contributions (``calibrate`` prints and writes them).

A block whose output hardly differs from its input at some noise level (``block_contribution`` [S, L] =
||B(x) - x|| / ||x|| per calibration timestep) costs compute there without changing much. For a budget b, the
(timestep phase, block) cells are skipped in ascending order of contribution until the nominal compute (share of
the block compute over a run, each phase weighted by its share of the schedule) is at or under b. The first and
last blocks stay (PARE Apply Router's default pins). The result is a PARE Static Block Schedule string
(``comfyui_pare.schedule``): a first speed-up with only a teacher and a few prompts, before any training.

Phases: calibration sigma s_k sits at schedule position p_k (``percent_of_sigma``); phase k is the part of the
schedule nearer to p_k than to its neighbours (boundaries at the midpoints, the first from 0, the last to 1), so a
step uses the statistics of the nearest calibration timestep. The node's ranges include both ends, so a skip range
is written to end ``EDGE`` before its phase's upper boundary: a step exactly on a boundary belongs to the later phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from comfyui_pare.safetensors_io import atomic_write_text
from comfyui_pare.schedule import SkipRange

from .sampling import percent_to_sigma

SUGGESTED_BUDGETS = (0.5, 0.6, 0.7, 0.8)
EDGE = 0.001  # schedule positions are written to 3 decimals


def percent_of_sigma(sigma: float, shift: float) -> float:
    """The schedule position (0 = start) whose sigma is ``sigma``: the inverse of ``sampling.percent_to_sigma``."""
    if sigma >= 1.0:
        return 0.0
    if sigma <= 0.0:
        return 1.0
    t = sigma / (shift - (shift - 1.0) * sigma)  # inverse of shift t / (1 + (shift - 1) t)
    return 1.0 - t


def phase_bounds(sigmas: Sequence[float], shift: float) -> list[tuple[float, float]]:
    """(start, end) schedule positions of each calibration timestep's phase (noisiest first), 3 decimals."""
    p = [percent_of_sigma(float(s), shift) for s in sigmas]
    if any(b <= a for a, b in zip(p, p[1:])):
        raise ValueError(f"calibration sigmas must be distinct and descending (noisiest first), got {list(sigmas)}")
    mid = [round((a + b) / 2, 3) for a, b in zip(p, p[1:])]
    return list(zip([0.0, *mid], [*mid, 1.0]))


@dataclass(frozen=True)
class Suggestion:
    budget: float
    schedule: str  # PARE Static Block Schedule text ("" when nothing is skipped)
    compute: float  # nominal share of the block compute over a run
    skipped: torch.Tensor  # bool [S, L] cells skipped


def format_schedule(skipped: torch.Tensor, bounds: Sequence[tuple[float, float]]) -> str:
    """Bool [S, L] skipped cells -> 'A-B@start-end' entries: each block's consecutive phases merged, consecutive
    blocks with the same range merged."""
    runs: list[tuple[float, float, int]] = []  # (start, end, block)
    s, n = skipped.shape
    for b in range(n):
        k = 0
        while k < s:
            if not bool(skipped[k, b]):
                k += 1
                continue
            j = k
            while j + 1 < s and bool(skipped[j + 1, b]):
                j += 1
            end = bounds[j][1]
            runs.append((bounds[k][0], end if end >= 1.0 else round(end - EDGE, 3), b))
            k = j + 1
    runs.sort()
    entries: list[list] = []  # [first, last, start, end]
    for start, end, b in runs:
        if entries and entries[-1][2:] == [start, end] and entries[-1][1] == b - 1:
            entries[-1][1] = b
        else:
            entries.append([b, b, start, end])

    def pct(v: float) -> str:
        return f"{round(v, 3):g}"

    return ", ".join(f"{a}-{z}@{pct(st)}-{pct(en)}" if a != z else f"{a}@{pct(st)}-{pct(en)}"
                     for a, z, st, en in entries)


def suggest(contribution: torch.Tensor, sigmas: Sequence[float], shift: float, budget: float,
            costs: Sequence[float] | None = None, pin_first: int = 1, pin_last: int = 1) -> Suggestion:
    """The greedy lowest-contribution schedule at ``budget`` (nominal compute at or under it, or as low as the
    pinned blocks allow)."""
    contribution = contribution.float()
    s, n = contribution.shape
    if len(sigmas) != s:
        raise ValueError(f"block_contribution has {s} timesteps but {len(sigmas)} sigmas were given")
    order = sorted(range(s), key=lambda k: -float(sigmas[k]))  # calibrate takes --sigmas in any order
    contribution, sigmas = contribution[order], [float(sigmas[k]) for k in order]
    bounds = phase_bounds(sigmas, shift)
    weight = torch.tensor([e - a for a, e in bounds], dtype=torch.float64)
    c = torch.ones(n, dtype=torch.float64) if costs is None else torch.as_tensor(costs, dtype=torch.float64)
    c = c / c.sum()
    free = torch.ones(n, dtype=torch.bool)
    free[:pin_first] = False
    if pin_last:
        free[n - pin_last:] = False
    cells = [(float(contribution[k, b]), k, b) for k in range(s) for b in range(n) if free[b] and weight[k] > 0]
    cells.sort()
    skipped = torch.zeros(s, n, dtype=torch.bool)
    compute = 1.0
    for _, k, b in cells:
        if compute <= budget + 1e-9:
            break
        skipped[k, b] = True
        compute -= float(weight[k] * c[b])
    return Suggestion(budget, format_schedule(skipped, bounds), compute, skipped)


def step_masks(ranges: Sequence[SkipRange], num_blocks: int, sigmas: Sequence[float], shift: float) -> torch.Tensor:
    """Bool [steps, num_blocks] (True: runs) of a static schedule at the sampler's step sigmas, by the rule of the
    node (``nodes/routing.py``'s ScheduleDecider: a range covers sigmas in [sigma(end), sigma(start)])."""
    keep = torch.ones(len(sigmas), num_blocks, dtype=torch.bool)
    for rng in ranges:
        high, low = percent_to_sigma(rng.start_percent, shift), percent_to_sigma(rng.end_percent, shift)
        for i, sig in enumerate(sigmas):
            if low <= float(sig) <= high:
                keep[i, rng.first_block:rng.last_block + 1] = False
    return keep


def write_suggestions(stats_path: str, contribution: torch.Tensor, sigmas: Sequence[float], shift: float,
                      budgets: Sequence[float] = SUGGESTED_BUDGETS) -> tuple[str, list[Suggestion]]:
    """Suggestions at ``budgets``, written as JSON beside the stats file (``<stem>_schedules.json``); returns (the
    JSON path, the suggestions)."""
    import json
    from pathlib import Path


    out = [suggest(contribution, sigmas, shift, b) for b in budgets]
    path = str(Path(stats_path).with_suffix("")) + "_schedules.json"
    body = {"shift": shift, "sigmas": [float(s) for s in sigmas], "pin_first": 1, "pin_last": 1,
            "how": "lowest block_contribution (timestep phase, block) cells skipped first until the nominal compute "
                   "is at or under the budget; paste 'schedule' into PARE Static Block Schedule",
            "schedules": [{"budget": s.budget, "schedule": s.schedule, "nominal_compute": round(s.compute, 4)}
                          for s in out]}
    atomic_write_text(path, json.dumps(body, indent=1))
    return path, out
