"""Which heads carry the toy teacher's motion? Ablate one self-attention head at a time (its columns of the ``o``
projection set to zero, so the head adds nothing to the block output) and measure the rise of the decoded videos'
trajectory error against the generator's ground truth, the same metric the pruning ablation is judged on.

Set beside calibration's head types and raw importance, this says whether the type-adjusted score can help on a
model: it helps where magnitude under-ranks the heads whose loss hurts motion most. Written as
``docs/toy_head_ablation.{json,png}`` by ``python -m training toyworld head-ablation``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from comfyui_pare.safetensors_io import atomic_write_text

from ..plots import category_grid_png, heatmap_png
from ..scores import MIXED, SPATIAL, TEMPORAL, TYPE_NAMES, adjust_importance
from . import evaluate

SPLITS = (("heldout", 1), ("seen", 3))  # the pruning ablation's prompts: every held-out one, every third seen one


@contextlib.contextmanager
def head_ablated(model: torch.nn.Module, block: int, position: int) -> Iterator[None]:
    """Within the block, zero the o-projection columns of the head at ``position`` (its index among the block's
    kept heads); the weights are restored exactly on exit."""
    attn = model.blocks[block].self_attn
    if not 0 <= position < attn.num_heads:
        raise IndexError(f"block {block} has {attn.num_heads} heads, no head at position {position}")
    cols = slice(position * attn.head_dim, (position + 1) * attn.head_dim)
    saved = attn.o.weight.data[:, cols].clone()
    attn.o.weight.data[:, cols] = 0
    try:
        yield
    finally:
        attn.o.weight.data[:, cols] = saved


def trajectory_error(model: torch.nn.Module, text, vae, shift: float, seed: int = 0) -> float:
    """Mean trajectory error (px) over the ablation's splits."""
    reps = [evaluate.evaluate(model, text, vae, split, shift, seed=seed, every=every)[0] for split, every in SPLITS]
    return sum(r.trajectory_error_px for r in reps) / len(reps)


@dataclass
class HeadAblation:
    baseline_px: float
    damage_px: torch.Tensor  # [L, H] rise of trajectory error when that head alone is ablated

    def compare(self, ratio: torch.Tensor, types: torch.Tensor, raw: torch.Tensor) -> dict:
        """How well each ranking (magnitude only, type-normalised) orders the heads by the damage their loss does."""
        adjusted = adjust_importance(raw, types)
        out = {"spearman": {"magnitude": spearman(raw, self.damage_px),
                            "type_normalised": spearman(adjusted, self.damage_px)},
               "within_block_pairs_ordered_like_damage": {"magnitude": pair_agreement(raw, self.damage_px),
                                                           "type_normalised": pair_agreement(adjusted, self.damage_px)},
               "per_type": {}}
        for t in (SPATIAL, TEMPORAL, MIXED):
            sel = types == t
            if sel.any():
                out["per_type"][TYPE_NAMES[t]] = {
                    "heads": int(sel.sum()), "mean_ratio": float(ratio[sel].mean()), "mean_raw": float(raw[sel].mean()),
                    "mean_damage_px": float(self.damage_px[sel].mean()),
                    "damage_per_unit_raw": float((self.damage_px[sel] / raw[sel].clamp_min(1e-12)).mean())}
        return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two equally shaped tensors (ties broken by position)."""
    ra, rb = (x.flatten().double().argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def pair_agreement(score: torch.Tensor, damage: torch.Tensor) -> list[int]:
    """[agreeing, total] head pairs within a block that ``score`` orders the same way as ``damage``; only
    within-block order decides which heads a block keeps once its count is fixed."""
    ok = total = 0
    for s, d in zip(score, damage):
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                ok += int(bool((s[i] - s[j]) * (d[i] - d[j]) > 0))
                total += 1
    return [ok, total]


@torch.no_grad()
def ablate_heads(model: torch.nn.Module, text, vae, shift: float, seed: int = 0) -> HeadAblation:
    """Every head of ``model``, one at a time."""
    base = trajectory_error(model, text, vae, shift, seed)
    heads = [(b, p) for b, blk in enumerate(model.blocks) for p in range(blk.self_attn.num_heads)]
    damage = torch.zeros(len(model.blocks), max(blk.self_attn.num_heads for blk in model.blocks), dtype=torch.float64)
    for b, p in tqdm(heads, desc="head ablation"):
        with head_ablated(model, b, p):
            damage[b, p] = trajectory_error(model, text, vae, shift, seed) - base
    return HeadAblation(base, damage)


def write_report(out: str | os.PathLike, result: HeadAblation, ratio: torch.Tensor, types: torch.Tensor,
                 raw: torch.Tensor) -> dict:
    """``out`` (.json) with the per-head table and the comparison; beside it a heat map of the damage (.png) and
    the head types on the same grid (_types.png)."""

    report = {"baseline_trajectory_error_px": result.baseline_px, "splits": [s for s, _ in SPLITS],
              "heads": [{"block": b, "head": h, "type": TYPE_NAMES[int(types[b, h])], "ratio": float(ratio[b, h]),
                         "raw_importance": float(raw[b, h]), "damage_px": float(result.damage_px[b, h])}
                        for b in range(raw.shape[0]) for h in range(raw.shape[1])],
              **result.compare(ratio, types, raw)}
    out = Path(out)
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    heatmap_png(out.with_suffix(".png"), result.damage_px.numpy(), "trajectory error rise (px), one head ablated",
                "blocks", "heads", cell=28)
    category_grid_png(out.with_name(out.stem + "_types.png"), types.numpy(), TYPE_NAMES, "head type (calibration)",
                      "blocks", "heads", cell=28)
    return report
