"""The routing report: a heat map of blocks x steps (per CFG branch) and a text summary.

The picture is plain numpy + Pillow so it can be tested without ComfyUI. Layout (pixels): a left margin for
block numbers, a top margin for step numbers; each (step, branch) is one column of CELL-wide cells, one row
per block (block 0 at the top); steps are separated by STEP_GAP pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 12
STEP_GAP = 3
LEFT = 26
TOP = 14
EXECUTED = (51, 191, 89)
SKIPPED = (40, 40, 46)
PARTIAL = (242, 190, 50)  # some samples of the batch ran the block, others skipped it
BACKGROUND = (12, 12, 16)
TEXT = (220, 220, 220)
BRANCH_NAMES = ("cond", "uncond")


@dataclass(frozen=True)
class StepRecord:
    """One denoising step: sigma and, per CFG branch present, the fraction of samples that ran each block."""

    sigma: float
    branches: tuple[int, ...]  # 0 = cond, 1 = uncond (ComfyUI's cond_or_uncond)
    ran: np.ndarray  # float [len(branches), num_blocks] in [0, 1], averaged over the step's evaluations
    evaluations: int = 1  # model evaluations in this step (2 for heun / dpmpp_2s_ancestral)


@dataclass(frozen=True)
class CallRecord:
    """One model call as the routing hook saw it: its sigma, CFG branches and per-row run mask."""

    sigma: float
    branches: tuple[int, ...]  # one per equal chunk of rows
    ran: np.ndarray  # bool/float [rows, num_blocks]


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _evaluations(calls: Sequence[CallRecord]) -> list[tuple[float, dict[int, list[np.ndarray]]]]:
    """Model evaluations: consecutive calls at one sigma with different branches (ComfyUI may split cond and
    uncond into separate calls when memory is short) are one evaluation."""
    evals: list[tuple[float, dict[int, list[np.ndarray]]]] = []
    for call in calls:
        ran = np.asarray(call.ran, dtype=np.float64)
        per = ran.shape[0] // max(1, len(call.branches))
        chunks = {b: ran[j * per:(j + 1) * per] for j, b in enumerate(call.branches)}
        if evals and _same(evals[-1][0], call.sigma) and not set(chunks) & set(evals[-1][1]):
            for b, rows in chunks.items():
                evals[-1][1][b] = [rows]
        else:
            evals.append((call.sigma, {b: [rows] for b, rows in chunks.items()}))
    return evals


def _step_of(evals: list, k: int, schedule: Sequence[float]) -> int | None:
    """The sampler step of evaluation k from the schedule's sigmas (None: no schedule point fits).

    An evaluation at a schedule point sigma_j starts step j, unless the next evaluation is at sigma_j too:
    then it is the second evaluation of step j-1 (heun evaluates at sigma_i and sigma_i+1). An evaluation
    between two points (dpmpp_2s_ancestral's midpoint) belongs to the step that starts above it.
    """
    s = evals[k][0]
    last = len(schedule) - 2  # index of the last step
    for j, point in enumerate(schedule[:-1]):
        if _same(point, s):
            following = evals[k + 1][0] if k + 1 < len(evals) else None
            return j - 1 if j > 0 and following is not None and _same(following, s) else j
    for j in range(last + 1):
        if schedule[j + 1] < s < schedule[j]:
            return j
    return None


def steps_from_calls(calls: Sequence[CallRecord], schedule: Sequence[float] | None = None) -> list[StepRecord]:
    """Group model calls into sampler steps (per CFG branch, averaged over the step's evaluations).

    ``schedule`` is the sampler's sigmas (steps + 1 values). Without it, or when a call's sigma fits no
    step, every evaluation is its own step.
    """
    evals = _evaluations(calls)
    groups: list[tuple[float, list[dict[int, list[np.ndarray]]]]] = []
    step_ids: list[int | None] = []
    for k, (sigma, by_branch) in enumerate(evals):
        step = _step_of(evals, k, schedule) if schedule is not None and len(schedule) >= 2 else None
        if step is not None and step_ids and step_ids[-1] is not None:
            step = max(step, step_ids[-1])  # steps never go back
        if step is not None and step_ids and step_ids[-1] == step:
            groups[-1][1].append(by_branch)
        else:
            groups.append((float(schedule[step]) if step is not None else sigma, [by_branch]))
        step_ids.append(step)
    out = []
    for sigma, members in groups:
        branches = tuple(sorted({b for m in members for b in m}))
        ran = np.stack([np.concatenate([r for m in members for r in m.get(b, [])]).mean(axis=0) for b in branches])
        out.append(StepRecord(sigma=sigma, branches=branches, ran=ran, evaluations=len(members)))
    return out


def cell_origin(step: int, column: int, block: int, columns_per_step: int) -> tuple[int, int]:
    """Top-left pixel (x, y) of a cell."""
    x = LEFT + step * (columns_per_step * CELL + STEP_GAP) + column * CELL
    return x, TOP + block * CELL


def cell_center(step: int, column: int, block: int, columns_per_step: int) -> tuple[int, int]:
    x, y = cell_origin(step, column, block, columns_per_step)
    return x + CELL // 2, y + CELL // 2


def branch_columns(steps: list[StepRecord]) -> tuple[int, ...]:
    """The branches shown as columns in every step: cond, then uncond if any step had it."""
    present = sorted({b for s in steps for b in s.branches})
    return tuple(present) or (0,)


def heatmap(steps: list[StepRecord], num_blocks: int) -> np.ndarray:
    """uint8 RGB image [H, W, 3] of the routing decisions."""
    cols = branch_columns(steps)
    n_steps = max(1, len(steps))
    width = LEFT + n_steps * (len(cols) * CELL + STEP_GAP)
    height = TOP + num_blocks * CELL + 2
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for b in range(num_blocks):
        draw.text((2, TOP + b * CELL), str(b), fill=TEXT, font=font)
    label_every = max(1, 2 * 8 // (len(cols) * CELL + STEP_GAP) + 1)
    for s, step in enumerate(steps):
        if s % label_every == 0:
            x, _ = cell_origin(s, 0, 0, len(cols))
            draw.text((x, 1), str(s), fill=TEXT, font=font)
        for c, branch in enumerate(cols):
            if branch not in step.branches:
                continue
            ran = step.ran[step.branches.index(branch)]
            for b in range(num_blocks):
                color = EXECUTED if ran[b] >= 1.0 else SKIPPED if ran[b] <= 0.0 else PARTIAL
                x, y = cell_origin(s, c, b, len(cols))
                draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=color)
    return np.asarray(img, dtype=np.uint8)


def summary_lines(steps: list[StepRecord], block_costs: list[float], wall_seconds: float, calls: int,
                  unrouted_calls: int = 0) -> list[str]:
    """Executed fraction (by block calls and by compute), compute saved, wall time of the routed calls.

    ``unrouted_calls``: model calls during which no PARE block patch ran (another node replaced the forward);
    they are not in ``steps``.
    """
    unrouted = (f"{unrouted_calls} model call(s) ran without PARE's block patches (another node replaced the "
                "model's forward), so they were not routed and are not counted here")
    if not steps:
        if unrouted_calls:
            return ["PARE routing: no routed model call in the last run", unrouted]
        return ["PARE routing: no sampling run recorded yet (connect the sampled LATENT so the report runs after it)."]
    costs = np.asarray(block_costs, dtype=np.float64)
    ran_calls = total_calls = ran_cost = total_cost = 0.0
    per_branch: dict[int, list[float]] = {}
    for step in steps:
        for row, branch in zip(step.ran, step.branches):
            ran_calls += float(row.sum()) * step.evaluations
            total_calls += row.size * step.evaluations
            ran_cost += float((row * costs).sum())
            total_cost += float(costs.sum())
            per_branch.setdefault(branch, []).append(float((row * costs).sum() / costs.sum()))
    frac = ran_cost / total_cost if total_cost else 1.0
    lines = [
        f"PARE routing: {len(steps)} steps, {len(branch_columns(steps))} branch(es), {len(costs)} blocks",
        f"block calls executed: {ran_calls:.0f} of {total_calls:.0f} ({100 * ran_calls / max(total_calls, 1):.1f}%)",
        f"block compute executed: {100 * frac:.1f}% (estimated saving {100 * (1 - frac):.1f}% of block compute)",
    ]
    for branch, fr in sorted(per_branch.items()):
        lines.append(f"  {BRANCH_NAMES[branch] if branch < 2 else branch}: {100 * sum(fr) / len(fr):.1f}% of block compute")
    evaluations = sum(s.evaluations for s in steps)
    if evaluations > len(steps):
        lines.append(f"sampler: {evaluations} model evaluations over {len(steps)} steps (up to "
                     f"{max(s.evaluations for s in steps)} per step, as heun or dpmpp_2s_ancestral do); a cell "
                     "averages its step's evaluations")
    if unrouted_calls:
        lines.append(unrouted)
    lines.append(f"wall time of routed model calls: {wall_seconds:.3f} s over {calls} call(s)")
    return lines
