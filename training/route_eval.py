"""What stage 2 is judged by: its compute, the threshold that meets the budget, and the static baseline.

* ``calibrate_threshold``: the router's stored default threshold, chosen on held-out inputs so the decisions
  spend the training budget (``decide`` with that threshold is what ``PAREApplyRouter`` does by default).
* ``best_contiguous_skip``: the static schedule a router has to beat, "the best contiguous skip from
  calibration": of the contiguous runs of unpinned blocks whose removal still spends at least the target compute
  (and at most ``tolerance`` more), the one whose blocks contributed least in calibration (mean over timesteps of
  ``block_contribution`` [S, L] = ||B(x) - x|| / ||x||), skipped at every step.
* ``velocity_error``: relative squared error of a model's velocity against the teacher's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from comfyui_pare.errors import PareFormatError
from comfyui_pare.safetensors_io import load_tensors
from comfyui_pare.schedule import SkipRange

from .stage_common import sample_sigmas
from .teacher import load_model

logger = logging.getLogger(__name__)


def calibrate_threshold(logits: torch.Tensor, costs: torch.Tensor, pinned: torch.Tensor, budget: float) -> float:
    """The threshold on sigmoid(logit) whose decisions over ``logits`` [M, N] spend closest to ``budget``.

    Candidates are 0.5 (the training gate) and the midpoints between consecutive sorted probabilities; among
    equally close ones the one nearest 0.5 wins, so a router that already meets its budget keeps 0.5.
    """
    probs = torch.sigmoid(logits.double())
    free = probs[:, ~pinned.cpu()].reshape(-1)
    weights = costs.double().cpu()[~pinned.cpu()].expand(probs.shape[0], -1).reshape(-1) / probs.shape[0]
    base = float(costs.double()[pinned.cpu()].sum())
    order = torch.sort(free, descending=True, stable=True)
    p_sorted, spent = order.values, base + torch.cumsum(weights[order.indices], 0)
    # Cut k keeps the k most probable entries: threshold between p_sorted[k - 1] and p_sorted[k].
    hi = torch.cat([torch.ones(1, dtype=torch.float64), p_sorted])
    lo = torch.cat([p_sorted, torch.zeros(1, dtype=torch.float64)])
    fractions = torch.cat([torch.tensor([base], dtype=torch.float64), spent])
    thresholds = ((hi + lo) / 2).clamp(0.0, 1.0)
    valid = hi > lo  # a cut between two equal probabilities is not realisable by a threshold
    err = (fractions - budget).abs().masked_fill(~valid, float("inf"))
    best = float(err.min())
    half_fraction = base + float((weights * (free > 0.5)).sum())
    if abs(half_fraction - budget) <= best + 1e-12:
        return 0.5
    near = (err <= best + 1e-12).nonzero().flatten()
    return float(thresholds[near[(thresholds[near] - 0.5).abs().argmin()]])


@dataclass(frozen=True)
class StaticSkip:
    """A static schedule: blocks ``first..last`` skipped at every step."""

    first: int
    last: int
    fraction: float  # executed share of block compute
    contribution: float  # summed mean calibration contribution of the skipped blocks

    @property
    def schedule(self) -> str:
        """The ``PAREStaticSchedule`` text for it."""
        return f"{self.first}-{self.last}@0.0-1.0"

    @property
    def skip_range(self) -> SkipRange:
        return SkipRange(self.first, self.last, 0.0, 1.0)

    def mask(self, num_blocks: int) -> torch.Tensor:
        """Bool [N]: True where the block runs."""
        m = torch.ones(num_blocks, dtype=torch.bool)
        m[self.first:self.last + 1] = False
        return m


def read_block_contribution(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_contribution [S, L], timesteps [S]) from a calibration stats file, validated."""
    tensors, _ = load_tensors(path, ["block_contribution", "timesteps"])
    contrib, ts = tensors["block_contribution"].float(), tensors["timesteps"].float()
    if contrib.ndim != 2 or ts.shape != (contrib.shape[0],):
        raise ValueError(f"{path}: block_contribution must be [S, L] with timesteps [S], got "
                         f"{list(contrib.shape)} and {list(ts.shape)}")
    return contrib, ts


def student_contribution(path: str, meta) -> torch.Tensor:
    """The calibration contributions [S, N] of the student's blocks: the teacher's columns of the blocks it kept
    (all of them unless it is depth-pruned)."""
    contribution, _ = read_block_contribution(path)
    if contribution.shape[1] != meta.dims.num_layers:
        raise PareFormatError(f"{path}: block_contribution has {contribution.shape[1]} blocks, the student's "
                              f"teacher has {meta.dims.num_layers}; calibrate the teacher this student was pruned from")
    return contribution[:, list(meta.teacher_blocks)]


class NoStaticSkip(ValueError):
    """No contiguous skip of unpinned blocks spends the target compute."""


def best_contiguous_skip(contribution: torch.Tensor, costs: torch.Tensor, pinned: torch.Tensor, target: float,
                         tolerance: float = 0.05) -> StaticSkip:
    """The calibration-best contiguous skip that spends at least ``target`` of the block compute.

    ``contribution`` is [S, L] (per timestep) or [L]; ``costs`` normalised block costs [L]; ``pinned`` bool [L]
    (never skipped). Candidates spend in [target, target + tolerance]; if none does, the ones spending least
    above ``target``. Raises ValueError when no contiguous skip of unpinned blocks spends at least ``target``
    while skipping something.
    """
    per_block = contribution.float().mean(dim=0) if contribution.ndim == 2 else contribution.float()
    n = costs.numel()
    if per_block.shape != (n,):
        raise ValueError(f"block contribution has {per_block.numel()} blocks, the model has {n}")
    c = costs.double()
    options = []
    for a in range(n):
        for b in range(a, n):
            if bool(pinned[a:b + 1].any()):
                break
            frac = 1.0 - float(c[a:b + 1].sum())
            if frac >= target - 1e-6:
                options.append(StaticSkip(a, b, frac, float(per_block[a:b + 1].sum())))
    if not options:
        raise NoStaticSkip(f"no contiguous skip of unpinned blocks spends at least {target:.3f} of the compute")
    near = [o for o in options if o.fraction <= target + tolerance]
    if not near:
        least = min(o.fraction for o in options)
        near = [o for o in options if o.fraction <= least + 1e-9]
    return min(near, key=lambda o: (o.contribution, o.fraction, o.first))


def static_baseline(contribution: torch.Tensor, costs: torch.Tensor, pinned: torch.Tensor,
                    target: float) -> StaticSkip | None:
    """``best_contiguous_skip`` at ``target``, or None when no contiguous skip spends that much (a router that
    skips less than the cheapest unpinned block, e.g. at a high budget, has no static twin to compare with)."""
    try:
        return best_contiguous_skip(contribution, costs, pinned, target)
    except NoStaticSkip:
        return None


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (x_t, timestep, context, clip)
VelocityFn = Callable[..., torch.Tensor]  # (x, timestep, context, clip_fea) -> velocity


@torch.no_grad()
def velocity_error(teacher: VelocityFn, model: VelocityFn, batches: Iterable[Batch]) -> float:
    """sum ||v_model - v_teacher||^2 / sum ||v_teacher||^2 over ``batches`` of (x_t, timestep, context, clip)."""
    num = den = 0.0
    for x, t, ctx, clip in batches:
        vt = teacher(x, t, ctx, clip).float()
        num += float((model(x, t, ctx, clip).float() - vt).square().sum())
        den += float(vt.square().sum())
    return num / max(den, 1e-30)


def eval_batches(stage, seed: int) -> list[Batch]:
    """Held-out inputs: each of the first ``route.eval_samples`` samples at ``route.eval_sigmas`` training-density
    sigmas, noise and sigmas from their own generator (``seed``), never the training one."""
    rc = stage.cfg.route
    gen = torch.Generator().manual_seed(seed)
    out = []
    for item in stage.samples[:rc.eval_samples]:
        sigma = sample_sigmas(stage.cfg.flow, rc.eval_sigmas, gen)
        noise = torch.randn((rc.eval_sigmas, *item.x0.shape), generator=gen)
        out.append(stage.inputs([item] * rc.eval_sigmas, sigma, noise))
    return out


def velocity_errors(cfg, stage, gated, routed, batches: list[Batch], executed: float) -> dict:
    """Router vs the static baseline of the same compute (on the stage-1 student), and both students whole."""
    teacher, student = stage.teacher, gated.student
    routed.masks.clear()
    errors = {"router": velocity_error(teacher, routed, batches), "stage2_all_blocks": velocity_error(teacher, student, batches)}
    stage1 = load_model(cfg.model.student, dtype=torch.float32, device=stage.info.device).eval()
    errors["stage1_all_blocks"] = velocity_error(teacher, stage1, batches)
    if cfg.route.stats is None:
        logger.info("no route.stats: the static baseline (best contiguous skip from calibration) is not measured")
        return errors
    contribution = student_contribution(cfg.route.stats, student.meta)
    static = static_baseline(contribution, stage.costs.cpu(), gated.pinned, executed)
    if static is None:
        logger.info("no static baseline: no contiguous skip of unpinned blocks spends the router's compute %.3f",
                    executed)
        return {**errors, "static_schedule": None}
    run = static.mask(student.num_blocks)

    def skipping(model):
        return lambda x, t, ctx, clip: model(x, t, ctx, clip, block_mask=run.expand(x.shape[0], -1).to(x.device))

    errors.update({"static_schedule": static.schedule, "static_fraction": static.fraction,
                   "static_stage1": velocity_error(teacher, skipping(stage1), batches),
                   "static_stage2": velocity_error(teacher, skipping(student), batches)})
    logger.info("velocity error vs teacher: router %.4g at compute %.3f; static %s (compute %.3f) %.4g",
                errors["router"], executed, static.schedule, static.fraction, errors["static_stage1"])
    return errors
