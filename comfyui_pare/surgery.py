"""Width pruning by plan: narrow a Wan state dict to the kept self-attention heads and FFN neurons.

This is the exact surgery the training pipeline reuses after it has chosen what to keep. A plan names the
kept indices in the teacher's numbering; pruning an already-pruned file keeps a subset of what it has.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import PareFormatError
from .pruned import PrunedWanMeta
from .wan import BlockWidth, block_prefix


@dataclass(frozen=True)
class BlockPlan:
    """Kept indices of one block; ``None`` keeps everything the input has."""

    heads: tuple[int, ...] | None = None
    ffn: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PrunePlan:
    blocks: tuple[BlockPlan, ...]

    @classmethod
    def from_json(cls, obj: Mapping, source: str = "plan") -> "PrunePlan":
        if not isinstance(obj, Mapping) or not isinstance(obj.get("blocks"), list):
            raise PareFormatError(f"{source}: a plan is a JSON object {{\"blocks\": [{{\"heads\": [...], \"ffn\": [...]}}, ...]}}")
        blocks = []
        for i, entry in enumerate(obj["blocks"]):
            if not isinstance(entry, Mapping):
                raise PareFormatError(f"{source}: blocks[{i}] must be an object with optional 'heads' and 'ffn' lists")
            unknown = set(entry) - {"heads", "ffn"}
            if unknown:
                raise PareFormatError(f"{source}: blocks[{i}] has unknown key(s) {sorted(unknown)}; use 'heads' and 'ffn'")
            blocks.append(BlockPlan(*(_indices(entry.get(k), f"{source}: blocks[{i}].{k}") for k in ("heads", "ffn"))))
        return cls(tuple(blocks))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrunePlan":
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise PareFormatError(f"{path}: plan file not found") from None
        except json.JSONDecodeError as e:
            raise PareFormatError(f"{path}: plan is not valid JSON ({e})") from e
        return cls.from_json(obj, source=str(path))


def _indices(value, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PareFormatError(f"{where}: must be a list of integers")
    if len(set(value)) != len(value):
        raise PareFormatError(f"{where}: has duplicate indices")
    return tuple(sorted(value))


def _positions(kept_now: tuple[int, ...], wanted: tuple[int, ...], total: int, what: str) -> list[int]:
    """Positions (in the current, possibly already narrowed, tensors) of the wanted teacher indices."""
    where = {j: p for p, j in enumerate(kept_now)}
    pos = []
    for j in wanted:
        if not 0 <= j < total:
            raise PareFormatError(f"{what}: index {j} is out of range [0, {total - 1}]")
        if j not in where:
            raise PareFormatError(f"{what}: index {j} was already pruned from the input, so it cannot be kept")
        pos.append(where[j])
    if not pos:
        raise PareFormatError(f"{what}: keeps nothing; at least one must be kept (skip whole blocks with a router)")
    return pos


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return torch.index_select(t, dim, idx).contiguous()


def prune_block(sd: dict[str, torch.Tensor], meta: PrunedWanMeta, i: int, plan: BlockPlan) -> BlockWidth:
    """Narrow block ``i`` of ``sd`` in place; returns its new widths (teacher numbering)."""
    dims, now = meta.dims, meta.blocks[i]
    heads = plan.heads if plan.heads is not None else now.heads
    ffn = plan.ffn if plan.ffn is not None else now.ffn
    p = block_prefix(i)
    hpos = _positions(now.heads, heads, dims.num_heads, f"plan block {i} heads")
    fpos = _positions(now.ffn, ffn, dims.ffn_dim, f"plan block {i} ffn")

    hd = dims.head_dim
    rows = torch.tensor([p_ * hd + c for p_ in hpos for c in range(hd)], dtype=torch.long)
    for name in ("q", "k", "v"):
        sd[f"{p}self_attn.{name}.weight"] = _take(sd[f"{p}self_attn.{name}.weight"], 0, rows)
        sd[f"{p}self_attn.{name}.bias"] = _take(sd[f"{p}self_attn.{name}.bias"], 0, rows)
    for name in ("norm_q", "norm_k"):
        sd[f"{p}self_attn.{name}.weight"] = _take(sd[f"{p}self_attn.{name}.weight"], 0, rows)
    sd[f"{p}self_attn.o.weight"] = _take(sd[f"{p}self_attn.o.weight"], 1, rows)

    neurons = torch.tensor(fpos, dtype=torch.long)
    sd[f"{p}ffn.0.weight"] = _take(sd[f"{p}ffn.0.weight"], 0, neurons)
    sd[f"{p}ffn.0.bias"] = _take(sd[f"{p}ffn.0.bias"], 0, neurons)
    sd[f"{p}ffn.2.weight"] = _take(sd[f"{p}ffn.2.weight"], 1, neurons)
    return BlockWidth(heads, ffn)


def prune_state_dict(
    sd: Mapping[str, torch.Tensor], meta: PrunedWanMeta, plan: PrunePlan
) -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """Return a new state dict narrowed by ``plan`` and its metadata. The input is not modified."""
    if len(plan.blocks) != meta.dims.num_layers:
        raise PareFormatError(
            f"plan has {len(plan.blocks)} block entries but the model has {meta.dims.num_layers} blocks "
            "(one entry per block; an empty object {} keeps a block whole)"
        )
    out = dict(sd)
    widths = tuple(prune_block(out, meta, i, bp) for i, bp in enumerate(plan.blocks))
    return out, PrunedWanMeta(meta.dims, widths)
