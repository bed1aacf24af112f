"""Pruning by plan: narrow a Wan state dict to the kept self-attention heads and FFN neurons, and (depth) drop
whole blocks.

This is the exact surgery the training pipeline reuses after it has chosen what to keep. A plan names the
kept indices in the teacher's numbering; pruning an already-pruned file keeps a subset of what it has. A plan's
optional ``kept_blocks`` (teacher block indices) removes the other blocks: the kept ones are renumbered
``blocks.0.`` ... in order and the metadata records which teacher block each one is.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .errors import PareFormatError
from .pruned import PrunedWanMeta
from .quant_layout import COMFY_QUANT
from .safetensors_io import StreamingWriter
from .untrusted import read_text_file
from .wan import BlockWidth, block_prefix
from .wan_reader import SCALE_INPUT, SCALE_WEIGHT, SCALED_FP8_MARKER, WanReader

logger = logging.getLogger(__name__)
MAX_PLAN_BYTES = 256 << 20  # a 14B plan listing every kept index is a few MB


@dataclass(frozen=True)
class BlockPlan:
    """Kept indices of one block; ``None`` keeps everything the input has."""

    heads: tuple[int, ...] | None = None
    ffn: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PrunePlan:
    blocks: tuple[BlockPlan, ...]  # one entry per block of the input
    kept_blocks: tuple[int, ...] | None = None  # teacher indices of the blocks to keep; None keeps them all

    def to_json(self) -> dict:
        obj: dict = {"blocks": [{k: list(v) for k, v in (("heads", b.heads), ("ffn", b.ffn)) if v is not None}
                                for b in self.blocks]}
        if self.kept_blocks is not None:
            obj["kept_blocks"] = list(self.kept_blocks)
        return obj

    @classmethod
    def from_json(cls, obj: Mapping, source: str = "plan") -> "PrunePlan":
        if not isinstance(obj, Mapping) or not isinstance(obj.get("blocks"), list):
            raise PareFormatError(f"{source}: a plan is a JSON object {{\"blocks\": [{{\"heads\": [...], \"ffn\": [...]}}, ...]}}")
        unknown = set(obj) - {"blocks", "kept_blocks"}
        if unknown:
            raise PareFormatError(f"{source}: unknown plan key(s) {sorted(unknown)}; use 'blocks' and 'kept_blocks'")
        blocks = []
        for i, entry in enumerate(obj["blocks"]):
            if not isinstance(entry, Mapping):
                raise PareFormatError(f"{source}: blocks[{i}] must be an object with optional 'heads' and 'ffn' lists")
            unknown = set(entry) - {"heads", "ffn"}
            if unknown:
                raise PareFormatError(f"{source}: blocks[{i}] has unknown key(s) {sorted(unknown)}; use 'heads' and 'ffn'")
            blocks.append(BlockPlan(*(_indices(entry.get(k), f"{source}: blocks[{i}].{k}") for k in ("heads", "ffn"))))
        return cls(tuple(blocks), _indices(obj.get("kept_blocks"), f"{source}: kept_blocks"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrunePlan":
        if not os.path.exists(path):
            raise PareFormatError(f"{path}: plan file not found")
        text = read_text_file(path, f"{path}: plan file", MAX_PLAN_BYTES)  # a regular file, bounded
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PareFormatError(f"{path}: plan is not valid JSON ({e})") from e
        except (ValueError, RecursionError) as e:  # integers of thousands of digits, nesting thousands deep
            raise PareFormatError(f"{path}: plan is not a usable JSON document ({type(e).__name__})") from None
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


@dataclass(frozen=True)
class Selection:
    """The kept slices of one tensor along one axis (positions in the input tensor)."""

    dim: int
    index: torch.Tensor

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return torch.index_select(t, self.dim, self.index).contiguous()


def block_selections(meta: PrunedWanMeta, i: int, plan: BlockPlan) -> tuple[dict[str, Selection], BlockWidth]:
    """What block ``i`` keeps of each narrowed tensor, and its new widths (teacher numbering)."""
    dims, now = meta.dims, meta.blocks[i]
    heads = plan.heads if plan.heads is not None else now.heads
    ffn = plan.ffn if plan.ffn is not None else now.ffn
    p = block_prefix(i)
    hpos = _positions(now.heads, heads, dims.num_heads, f"plan block {i} heads")
    fpos = _positions(now.ffn, ffn, dims.ffn_dim, f"plan block {i} ffn")

    hd = dims.head_dim
    rows = torch.tensor([p_ * hd + c for p_ in hpos for c in range(hd)], dtype=torch.long)
    neurons = torch.tensor(fpos, dtype=torch.long)
    sel: dict[str, Selection] = {}
    for name in ("q", "k", "v"):
        sel[f"{p}self_attn.{name}.weight"] = sel[f"{p}self_attn.{name}.bias"] = Selection(0, rows)
    for name in ("norm_q", "norm_k"):
        sel[f"{p}self_attn.{name}.weight"] = Selection(0, rows)
    sel[f"{p}self_attn.o.weight"] = Selection(1, rows)
    sel[f"{p}ffn.0.weight"] = sel[f"{p}ffn.0.bias"] = Selection(0, neurons)
    sel[f"{p}ffn.2.weight"] = Selection(1, neurons)
    return sel, BlockWidth(heads, ffn)


def plan_selections(meta: PrunedWanMeta, plan: PrunePlan) -> tuple[dict[str, Selection], PrunedWanMeta]:
    """Every narrowed tensor's selection for ``plan`` (input keys), and the metadata of the result."""
    if len(plan.blocks) != meta.num_blocks:
        raise PareFormatError(
            f"plan has {len(plan.blocks)} block entries but the model has {meta.num_blocks} blocks "
            "(one entry per block; an empty object {} keeps a block whole)"
        )
    sel: dict[str, Selection] = {}
    widths = []
    for i, bp in enumerate(plan.blocks):
        block_sel, width = block_selections(meta, i, bp)
        sel.update(block_sel)
        widths.append(width)
    kept = kept_positions(meta, plan)
    out_kept = tuple(meta.teacher_blocks[i] for i in kept)
    return sel, PrunedWanMeta(meta.dims, tuple(widths[i] for i in kept), out_kept)


def kept_positions(meta: PrunedWanMeta, plan: PrunePlan) -> list[int]:
    """Input block positions the plan keeps, in order (all of them without ``kept_blocks``)."""
    if plan.kept_blocks is None:
        return list(range(meta.num_blocks))
    where = {t: i for i, t in enumerate(meta.teacher_blocks)}
    for t in plan.kept_blocks:
        if not 0 <= t < meta.dims.num_layers:
            raise PareFormatError(f"plan kept_blocks: teacher block {t} is out of range [0, {meta.dims.num_layers - 1}]")
        if t not in where:
            raise PareFormatError(f"plan kept_blocks: teacher block {t} was already removed from the input "
                                  f"(it has teacher blocks {list(meta.teacher_blocks)}), so it cannot be kept")
    if not plan.kept_blocks:
        raise PareFormatError("plan kept_blocks: keeps no block; at least one must be kept")
    return [where[t] for t in plan.kept_blocks]


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def block_renames(meta: PrunedWanMeta, plan: PrunePlan) -> Callable[[str], str | None]:
    """Input key -> output key: a kept block's keys renumbered to its new position, None for a removed block."""
    new_index = {old: new for new, old in enumerate(kept_positions(meta, plan))}

    def rename(key: str) -> str | None:
        m = _BLOCK_KEY.match(key)
        if m is None:
            return key
        new = new_index.get(int(m.group(1)))
        return None if new is None else f"{block_prefix(new)}{key[m.end():]}"

    return rename


def prune_state_dict(
    sd: Mapping[str, torch.Tensor], meta: PrunedWanMeta, plan: PrunePlan
) -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """Return a new state dict narrowed (and depth-pruned) by ``plan`` and its metadata. The input is not modified."""
    sel, out_meta = plan_selections(meta, plan)
    rename = block_renames(meta, plan)
    out = {}
    for k, v in sd.items():
        new = rename(k)
        if new is not None:
            out[new] = sel[k].apply(v) if k in sel else v
    return out, out_meta


def prune_file(reader: WanReader, plan: PrunePlan, out: str | os.PathLike) -> PrunedWanMeta:
    """Write the student of ``plan`` to ``out``, streaming: one input tensor is held at a time.

    The student is in the original layout whatever the input's. A scaled fp8 input gives a scaled student in the
    same quantization layout: each weight keeps its stored fp8 values and its own 0-d weight / input scale (a
    per-tensor scale is the same for every row and column kept), and the ``scaled_fp8`` marker is kept as stored,
    or each kept layer its ``.comfy_quant`` config (written as a tensor, also where the input had it in its header:
    layer names change when blocks are removed).
    """
    sel, out_meta = plan_selections(reader.meta, plan)
    rename = block_renames(reader.meta, plan)
    shapes = out_meta.expected_shapes()
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key in reader.keys():
        new = rename(key)
        if new is None:  # a removed block: never read
            continue
        specs[new] = (reader.dtype(key), shapes[new])
        sources[new] = (lambda k=key: sel[k].apply(reader.tensor(k))) if key in sel else (lambda k=key: reader.tensor(k))
        base = new[: -len(".weight")]
        for kind, tensor in ((SCALE_WEIGHT, reader.scale(key)), (SCALE_INPUT, reader.input_scale(key))):
            if tensor is not None:  # 0-d: read now, they are tiny
                name = f"{base}.{reader.stored_scale_name(kind)}"
                specs[name] = (tensor.dtype, tuple(tensor.shape))
                sources[name] = lambda t=tensor: t
        conf = reader.layer_quant(key)
        if conf is not None:
            encoded = conf.encode()
            specs[f"{base}.{COMFY_QUANT}"] = (encoded.dtype, tuple(encoded.shape))
            sources[f"{base}.{COMFY_QUANT}"] = lambda t=encoded: t
    marker = reader.marker()
    if marker is not None:
        specs[SCALED_FP8_MARKER] = (marker.dtype, tuple(marker.shape))
        sources[SCALED_FP8_MARKER] = lambda: marker
    with StreamingWriter(out, specs, out_meta.to_header()) as writer:
        step = max(1, len(writer.order) // 10)
        for n, key in enumerate(writer.order, 1):
            writer.write(key, sources[key]())
            if n % step == 0 or n == len(writer.order):  # the pack has no tqdm; a line per tenth instead
                logger.info("prune: %d/%d tensors written to %s", n, len(writer.order), out)
    return out_meta
