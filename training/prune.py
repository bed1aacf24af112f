"""``python -m training prune``: calibration stats + width targets -> a plan -> a student, by the core surgery.

Heads: one global ranking of the type-adjusted scores (``scores.adjust_importance``) over every block; each block
first keeps its best ``ceil(head_floor x H)`` heads (at least one), the remaining budget goes to the best heads
anywhere. FFN neurons: the same global ranking of norm-product scores with per-block floors fixes how many
neurons each block keeps, rounded to a multiple of ``ffn_multiple`` (64: tensor-core friendly; head counts too, so
heads x head dim lands on it where the head dim allows, e.g. pairs of heads at head dim 32); within a block
neurons are taken greedily in score order, skipping one whose ``ffn.0`` input weights have cosine similarity
above ``dedup_threshold`` with a neuron already kept (near-duplicates add little), filling up from the skipped
ones if needed. The plan is written with ``--plan-out`` and applied with ``comfyui_pare.surgery``.

``--depth static`` (VDMini) also removes whole teacher blocks, chosen from the stats' ``block_contribution`` by
``training.depth`` (``--remove-blocks K`` or a compute target ``--depth-target``, counted on the widths chosen
above); the student has fewer, renumbered blocks and its metadata lists the teacher blocks it kept. Width targets
default to 1 (keep every head and neuron), so depth pruning can be used alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, replace

import torch

from comfyui_pare.alignment import head_grain
from comfyui_pare.errors import PareFormatError
from comfyui_pare.pruned import PrunedWanMeta, describe, save_checkpoint
from comfyui_pare.safetensors_io import atomic_write_text
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.wan import BlockWidth

from .calibrate import CalibrationStats
from .depth import add_depth_arguments, choose_kept_blocks, depth_options
from .scores import adjust_importance, classify, parse_protection
from .teacher import load_wan

logger = logging.getLogger(__name__)

HELP = "turn calibration stats and width targets into a plan and a pruned student"


@dataclass(frozen=True)
class PruneTargets:
    heads: float  # kept fraction of all self-attention heads
    ffn: float  # kept fraction of all FFN neurons
    head_floor: float = 0.25  # every block keeps at least this fraction of its heads (and at least one)
    ffn_floor: float = 0.25
    protection: str = "normalize"
    ffn_multiple: int = 64
    dedup_threshold: float = 0.95  # > 1 disables the near-duplicate skip

    def validate(self) -> None:
        for name, low_ok in (("heads", False), ("ffn", False), ("head_floor", True), ("ffn_floor", True)):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0 and (low_ok or v > 0.0)):
                raise ValueError(f"--{name.replace('_', '-')} must be a fraction in {'[0' if low_ok else '(0'}, 1], "
                                 f"got {v}")
        if self.ffn_multiple < 1:
            raise ValueError(f"--ffn-multiple must be >= 1, got {self.ffn_multiple}")
        parse_protection(self.protection)


def global_counts(scores: list[torch.Tensor], keep: float, floor: float) -> list[int]:
    """How many units each block keeps: per-block floors first, then the best remaining units anywhere."""
    sizes = [len(s) for s in scores]
    floors = [min(n, max(1, math.ceil(floor * n))) for n in sizes]
    total = max(sum(floors), round(keep * sum(sizes)))
    counts = list(floors)
    pool = []
    for b, s in enumerate(scores):
        order = torch.argsort(s.double(), descending=True, stable=True)
        pool += [(float(s[j]), b) for j in order[floors[b]:].tolist()]
    pool.sort(key=lambda t: -t[0])  # stable: ties keep block order, then index order
    for _, b in pool[:total - sum(floors)]:
        counts[b] += 1
    return counts


def round_to_multiple(count: int, size: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` (at least one multiple), never more than the block has."""
    if size <= multiple:
        return size
    return min(size, max(multiple, multiple * round(count / multiple)))


def greedy_dedup(scores: torch.Tensor, weight: torch.Tensor, count: int, threshold: float,
                 chunk: int = 2048) -> list[int]:
    """``count`` neurons in score order, skipping near-duplicates (cosine of ``weight`` rows above threshold)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    if threshold > 1.0:
        return sorted(order[:count].tolist())
    w = torch.nn.functional.normalize(weight.float(), dim=1)
    dup = torch.zeros(len(w), len(w), dtype=torch.bool)
    for start in range(0, len(w), chunk):
        dup[start:start + chunk] = (w[start:start + chunk] @ w.T) > threshold
    blocked = torch.zeros(len(w), dtype=torch.bool)
    kept, skipped = [], []
    for j in order.tolist():
        if len(kept) == count:
            break
        if blocked[j]:
            skipped.append(j)
            continue
        kept.append(j)
        blocked |= dup[j]
    kept += skipped[:count - len(kept)]
    if len(kept) < count:  # everything scanned: fill from the rest in score order
        rest = [j for j in order.tolist() if j not in set(kept)]
        kept += rest[:count - len(kept)]
    return sorted(kept)


def check_stats(stats: CalibrationStats, meta: PrunedWanMeta, source: str) -> None:
    dims = meta.dims
    if meta.is_pruned:
        raise PareFormatError(f"{source}: prune expects the full-width teacher the stats were computed on")
    want = (dims.num_layers, dims.num_heads)
    for key in ("head_ratio", "head_importance"):
        got = tuple(getattr(stats, key).shape)
        if got != want:
            raise PareFormatError(f"{source}: stats tensor '{key}' has shape {list(got)}, the teacher has "
                                  f"{list(want)} (blocks, heads): were the stats computed on another model?")
    for i, f in enumerate(stats.ffn_importance):
        if f.shape != (dims.ffn_dim,):
            raise PareFormatError(f"{source}: stats tensor 'ffn_importance.{i}' has shape {list(f.shape)}, "
                                  f"expected [{dims.ffn_dim}]")


def make_plan(stats: CalibrationStats, sd: dict[str, torch.Tensor], meta: PrunedWanMeta,
              targets: PruneTargets) -> PrunePlan:
    """The plan (kept heads and FFN neurons per block, teacher numbering)."""
    targets.validate()
    opts = stats.summary.get("options", {})
    types = classify(stats.head_ratio, opts.get("spatial_threshold", 0.7), opts.get("temporal_threshold", 0.3))
    adjusted = adjust_importance(stats.head_importance, types, targets.protection)
    head_counts = global_counts(list(adjusted), targets.heads, targets.head_floor)
    ffn_counts = global_counts(stats.ffn_importance, targets.ffn, targets.ffn_floor)
    # Head widths (heads x head_dim) on the same grain: a no-op for head dim 128, whole pairs of heads at head dim 32.
    grain = head_grain(meta.dims.head_dim, targets.ffn_multiple)
    blocks = []
    for i in range(meta.dims.num_layers):
        n_heads = round_to_multiple(head_counts[i], meta.dims.num_heads, grain)
        heads = torch.argsort(adjusted[i], descending=True, stable=True)[:n_heads].sort().values.tolist()
        n_ffn = round_to_multiple(ffn_counts[i], meta.dims.ffn_dim, targets.ffn_multiple)
        ffn = greedy_dedup(stats.ffn_importance[i], sd[f"blocks.{i}.ffn.0.weight"], n_ffn, targets.dedup_threshold)
        blocks.append(BlockPlan(tuple(heads), tuple(ffn)))
    return PrunePlan(tuple(blocks))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="the full-width Wan2.1 teacher the stats were computed on")
    p.add_argument("--stats", required=True, help="stats file from `python -m training calibrate`")
    p.add_argument("--heads", type=float, default=1.0, help="kept fraction of all self-attention heads, e.g. 0.75")
    p.add_argument("--ffn", type=float, default=1.0, help="kept fraction of all FFN neurons, e.g. 0.7")
    p.add_argument("--out", required=True, help="student checkpoint to write (pruned format)")
    p.add_argument("--plan-out", default=None, help="also write the plan JSON here")
    p.add_argument("--protect", default="normalize", help="temporal head protection: normalize | scale:<k> | none")
    p.add_argument("--head-floor", type=float, default=0.25, help="per-block minimum kept fraction of heads")
    p.add_argument("--ffn-floor", type=float, default=0.25, help="per-block minimum kept fraction of FFN neurons")
    p.add_argument("--ffn-multiple", type=int, default=64, help="round FFN widths to a multiple of this, and self-attention widths (heads x head dim) "
                        "where the head dim allows (1: off)")
    p.add_argument("--dedup-threshold", type=float, default=0.95,
                   help="skip FFN neurons whose input weights have cosine above this with a kept one (>1: off)")
    add_depth_arguments(p)


def run(args: argparse.Namespace) -> int:
    targets = PruneTargets(args.heads, args.ffn, args.head_floor, args.ffn_floor, args.protect, args.ffn_multiple,
                           args.dedup_threshold)
    try:
        targets.validate()
    except ValueError as e:
        raise PareFormatError(str(e)) from None
    depth = depth_options(args)
    stats = CalibrationStats.load(args.stats)
    sd, meta = load_wan(args.teacher)
    check_stats(stats, meta, args.stats)
    plan = make_plan(stats, sd, meta, targets)
    if depth is not None:
        widths = [BlockWidth(b.heads, b.ffn) for b in plan.blocks]
        plan = replace(plan, kept_blocks=choose_kept_blocks(stats.block_contribution, depth, meta.dims, widths))
    if args.plan_out:
        atomic_write_text(args.plan_out, json.dumps(plan.to_json()))
    student, student_meta = prune_state_dict(sd, meta, plan)
    save_checkpoint(args.out, student, student_meta)
    summary = describe(student_meta)
    logger.info("wrote %s: %d of %d blocks, %.1f%% of heads, %.1f%% of FFN neurons kept (protection %s)", args.out,
                student_meta.num_blocks, meta.dims.num_layers, 100 * summary["kept_heads_fraction"],
                100 * summary["kept_ffn_fraction"], args.protect)
    return 0
