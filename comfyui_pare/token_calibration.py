"""Token redundancy per block and timestep, and the schedule it implies (the statistics half of asymrnr-calibrate).

Redundancy of a feature (queries, or values for keys/values) at a block and step: the mean cosine similarity of
every source token to its most similar destination on the reduction grid (``token_reduction.match_tokens``),
averaged over batch rows, heads and calibration samples. High redundancy means merging loses little there.

``schedule_from_redundancy`` spends a target mean ratio per feature where redundancy is highest: the cells
(block, step) are ranked and the most redundant ones get ``max_ratio`` until the mean ratio over all cells reaches
the target (AsymRnR's "reduce where redundant" rule, as a budget). Cells become rules over the schedule positions
that each calibration step stands for, so the schedule applies at any step count.

The model-running half (which features, from which model, on which samples) lives with the trainable Wan in
``training/token_calibrate.py``: this module has no model and imports neither ComfyUI nor training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import PareError
from .token_reduction import plan_matching
from .token_schedule import FEATURES, ReductionRule, TokenSchedule


@dataclass
class RedundancyTable:
    """Running means of redundancy [feature (q, kv), block, step]."""

    num_blocks: int
    num_steps: int
    stride: tuple[int, int, int] = (1, 2, 2)
    seed: int = 0
    sums: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(FEATURES), self.num_blocks, self.num_steps, dtype=torch.float64)
        self.counts = torch.zeros_like(self.sums)

    def add(self, feature: str, block: int, step: int, x: torch.Tensor, grid: tuple[int, int, int]) -> float:
        """Measure ``x`` [B, H, L, d] (RoPE applied, as attention sees it) and add it; returns the measurement.

        The split is drawn from (seed, block, step), so every sample is measured on the same destinations."""
        gen = torch.Generator().manual_seed((self.seed * 1000 + block) * 1000 + step)
        score = plan_matching(x, grid, self.stride, "cosine", gen).score
        f = FEATURES.index(feature)
        self.sums[f, block, step] += score.double().sum()
        self.counts[f, block, step] += score.numel()
        return float(score.mean())

    def mean(self) -> torch.Tensor:
        if (self.counts == 0).any():
            f, b, s = (self.counts == 0).nonzero()[0].tolist()
            raise PareError(f"no measurement for feature {FEATURES[f]}, block {b}, step {s}")
        return (self.sums / self.counts).float()


def step_ranges(step_percents: list[float]) -> list[tuple[float, float]]:
    """The schedule positions each calibration step stands for: from the midpoint with the previous step to the
    midpoint with the next (the first starts at 0, the last ends at 1)."""
    mids = [(a + b) / 2 for a, b in zip(step_percents, step_percents[1:])]
    return list(zip([0.0, *mids], [*mids, 1.0]))


def schedule_from_redundancy(redundancy: torch.Tensor, step_percents: list[float], target_q: float,
                             target_kv: float, max_ratio: float = 0.75, *, stride: tuple[int, int, int] = (1, 2, 2),
                             mode: str = "mean", seed: int = 0, name: str = "calibrated",
                             info: dict | None = None) -> TokenSchedule:
    """Rules that reach mean ratios ``target_q`` / ``target_kv`` over all (block, step) cells, at ``max_ratio``
    on the most redundant cells. ``redundancy`` is [2 (q, kv), blocks, steps]."""
    if not 0.0 < max_ratio < 1.0:
        raise PareError(f"max_ratio must be in (0, 1), got {max_ratio}")
    _, num_blocks, num_steps = redundancy.shape
    if len(step_percents) != num_steps:
        raise PareError(f"{len(step_percents)} step percents for {num_steps} calibrated steps")
    ranges = step_ranges(step_percents)
    rules: list[ReductionRule] = []
    for f, (feature, target) in enumerate(zip(FEATURES, (target_q, target_kv))):
        if not 0.0 <= target <= max_ratio:
            raise PareError(f"target ratio for {feature} must be in [0, max_ratio={max_ratio}], got {target}")
        cells = round(target / max_ratio * num_blocks * num_steps)
        on = torch.zeros(num_blocks * num_steps, dtype=torch.bool)
        on[torch.sort(redundancy[f].flatten(), descending=True, stable=True).indices[:cells]] = True
        on = on.view(num_blocks, num_steps)
        for b in range(num_blocks):
            s = 0
            while s < num_steps:
                if not on[b, s]:
                    s += 1
                    continue
                e = s
                while e + 1 < num_steps and on[b, e + 1]:
                    e += 1
                rules.append(ReductionRule(feature, (b,), max_ratio, ranges[s][0], ranges[e][1]))
                s = e + 1
    calibration = {"redundancy": {feat: redundancy[f].tolist() for f, feat in enumerate(FEATURES)},
                   "step_percents": list(step_percents), "target_q": target_q, "target_kv": target_kv,
                   **(info or {})}
    return TokenSchedule(tuple(rules), tuple(stride), "cosine", mode, True, seed, num_blocks, name, calibration)
