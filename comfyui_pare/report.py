"""The routing report: a heat map of blocks x steps (per CFG branch) and a text summary.

The picture is plain numpy + Pillow so it can be tested without ComfyUI. Layout (pixels): a left margin for
block numbers, a top margin for step numbers; each (step, branch) is one column of CELL-wide cells, one row
per block (block 0 at the top); steps are separated by STEP_GAP pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    ran: np.ndarray  # float [len(branches), num_blocks] in [0, 1]


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


def summary_lines(steps: list[StepRecord], block_costs: list[float], wall_seconds: float, calls: int) -> list[str]:
    """Executed fraction (by block calls and by compute), compute saved, wall time of the routed calls."""
    if not steps:
        return ["PARE routing: no sampling run recorded yet (connect the sampled LATENT so the report runs after it)."]
    costs = np.asarray(block_costs, dtype=np.float64)
    ran_calls = total_calls = ran_cost = total_cost = 0.0
    per_branch: dict[int, list[float]] = {}
    for step in steps:
        for row, branch in zip(step.ran, step.branches):
            ran_calls += float(row.sum())
            total_calls += row.size
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
    lines.append(f"wall time of routed model calls: {wall_seconds:.3f} s over {calls} call(s)")
    return lines
