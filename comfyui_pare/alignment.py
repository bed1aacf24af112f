"""Tensor-core widths: exact zero padding of a pruned Wan to the GEMM grain at load, and plans rounded to it.

A GEMM whose inner or output width is not a multiple of the tile falls off the tensor-core path: on an H200 a
14B-width student with FFN 9677 stepped at 0.81x the teacher, the same student at FFN 10368 at 1.65x (issue 21).
fp16/bf16 kernels want multiples of 64 (``TENSOR_CORE_MULTIPLE``); fp8 ``_scaled_mm`` wants multiples of 16
(``pruned.FP8_MATMUL_MULTIPLE``), which 64 covers. So whatever widths a student file has, the loader builds the
model at widths on that grain (``pad_state_dict``), with a transform that leaves the function unchanged:

* FFN: extra rows of ``ffn.0`` (weight and bias) are zero, so the extra neurons compute GELU(0) = 0, and the extra
  columns of ``ffn.2`` are zero, so they add nothing. Exact, bit for bit in every dtype (fp8 zeros included).
* Self-attention: extra whole heads whose q, k, v rows (and biases) are zero and whose ``o`` columns are zero: they
  attend with zero queries over zero values and add nothing. But Wan's ``norm_q`` / ``norm_k`` are RMSNorms over the
  whole inner width (all heads), so zero heads lower the mean square from m to (n/N) m (n real, N padded channels).
  Scaling the real q and k rows (weights and biases) by s = sqrt(N/n) restores it: mean square (n/N) s^2 m = m, so
  the norm divides by the same sqrt(m + eps) as before (eps unchanged), and the norm weights divided by s undo the
  s on the real channels: y = (s q) / sqrt(m + eps) * (w / s) = q / sqrt(m + eps) * w. Exact in real arithmetic;
  in floating point the rescaled q/k weights and norm weights carry one rounding of their dtype (fp32: a few ulps).
  For an fp8_scaled file the factor goes into the 0-d ``scale_weight`` instead, so the fp8 weights are untouched.
  Plain fp8 weights without a scale cannot be rescaled exactly; those blocks keep their head count (logged).
  Head padding is only ever needed for head dims that are not a multiple of 64: real Wan2.1 (head dim 128) never
  pads heads, so for it the transform is the exact FFN zero padding alone.

Everything that reports compute (``compute``, the routing report, ``inspect``) keeps describing the student's own
widths: the loader builds the model from the padded *build* metadata and attaches the student's metadata. A LoRA
cut to the student's widths is padded the same way (``pad_lora``) so it fits the padded weights and merges to
the same function.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Collection, Mapping

import torch

from .lora import LoraPatch, ParsedLora, split_block
from .pruned import FP8_MATMUL_MULTIPLE, PrunedWanMeta, unaligned_widths
from .surgery import BlockPlan, PrunePlan
from .wan import BlockWidth

logger = logging.getLogger(__name__)

TENSOR_CORE_MULTIPLE = 64  # fp16/bf16 GEMM grain; a multiple of FP8_MATMUL_MULTIPLE, so fp8 matmuls take it too
assert TENSOR_CORE_MULTIPLE % FP8_MATMUL_MULTIPLE == 0
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_QK = ("q", "k")


@dataclass(frozen=True)
class BlockAlignment:
    """One block's widths as stored (``heads``, ``ffn``) and as the loader builds them (``padded_*``)."""

    heads: int
    padded_heads: int
    ffn: int
    padded_ffn: int

    @property
    def head_scale(self) -> float:
        """s = sqrt(N / n): the factor on the real q/k rows that keeps the whole-width RMSNorm exact."""
        return math.sqrt(self.padded_heads / self.heads)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def head_grain(head_dim: int, multiple: int = TENSOR_CORE_MULTIPLE) -> int:
    """Smallest head count whose width (heads x head_dim) is a multiple of ``multiple`` (1 for head dim 128)."""
    return multiple // math.gcd(head_dim, multiple)


def aligned_heads(heads: int, head_dim: int, limit: int, multiple: int = TENSOR_CORE_MULTIPLE) -> int:
    """``heads`` rounded up to the grain, or ``heads`` itself when that would exceed ``limit`` (the teacher's count:
    ComfyUI's Wan reads the head count of cross-attention from the same config, so it cannot grow)."""
    padded = round_up(heads, head_grain(head_dim, multiple))
    return padded if padded <= limit else heads


def alignment_plan(meta: PrunedWanMeta, multiple: int = TENSOR_CORE_MULTIPLE,
                   keep_heads: Collection[int] = ()) -> tuple[BlockAlignment, ...]:
    """The widths the loader builds for every block of ``meta``; blocks in ``keep_heads`` keep their head count
    (``unscalable_blocks``)."""
    d = meta.dims
    return tuple(BlockAlignment(b.num_heads, b.num_heads if i in keep_heads else
                                aligned_heads(b.num_heads, d.head_dim, d.num_heads, multiple),
                                b.ffn_dim, round_up(b.ffn_dim, multiple)) for i, b in enumerate(meta.blocks))


def unscalable_blocks(num_blocks: int, dtype_of: Callable[[str], torch.dtype], has_scale: Callable[[str], bool]
                      ) -> set[int]:
    """Blocks whose q or k weight is fp8 without a ``scale_weight``: multiplying it by s would re-round it in fp8,
    so padded heads could not be exact there and those blocks keep their head count."""
    return {i for i in range(num_blocks) for n in _QK
            if dtype_of(f"blocks.{i}.self_attn.{n}.weight") in _FP8 and not has_scale(f"blocks.{i}.self_attn.{n}.weight")}


def loaded_meta(meta: PrunedWanMeta, keep_heads: Collection[int] = (),
                multiple: int = TENSOR_CORE_MULTIPLE) -> PrunedWanMeta:
    """The build metadata of the model PARE Load Pruned Wan makes from a file with ``meta`` (its shapes are what a
    LoRA must fit: ``lora-slice`` pads to them)."""
    return build_meta(meta, alignment_plan(meta, multiple, keep_heads))


def build_meta(meta: PrunedWanMeta, plan: tuple[BlockAlignment, ...]) -> PrunedWanMeta:
    """Metadata describing the padded model (for building it only: indices are positions, not teacher neurons).

    The teacher FFN width grows when a padded block is wider than the teacher (an off-grain teacher), since every
    width must fit inside it; the head count never does (``aligned_heads``)."""
    ffn_dim = max(meta.dims.ffn_dim, *(a.padded_ffn for a in plan))
    blocks = tuple(BlockWidth(tuple(range(a.padded_heads)), tuple(range(a.padded_ffn))) for a in plan)
    return PrunedWanMeta(replace(meta.dims, ffn_dim=ffn_dim), blocks, meta.kept_blocks)


def describe_alignment(meta: PrunedWanMeta, multiple: int = TENSOR_CORE_MULTIPLE) -> dict:
    """What ``inspect`` reports: whether the stored widths are on the grain and what the loader builds."""
    plan = alignment_plan(meta, multiple)
    hd = meta.dims.head_dim
    unaligned = unaligned_widths(meta, multiple)
    return {
        "multiple": multiple,
        "aligned": not unaligned,
        "unaligned": unaligned,
        "fp8_matmul_ready": not unaligned_widths(meta, FP8_MATMUL_MULTIPLE),
        # Zero padding added at load (exact); compute and reports count the stored widths, not these.
        "loaded_widths": [{"self_attention": a.padded_heads * hd, "heads": a.padded_heads, "ffn": a.padded_ffn}
                          for a in plan],
        "padded_blocks": sum(a.padded_heads != a.heads or a.padded_ffn != a.ffn for a in plan),
    }


# -- state dict -----------------------------------------------------------------------------------------------

def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size`` (+0.0 in every float dtype, fp8 included)."""
    if t.shape[dim] == size:
        return t
    extra = list(t.shape)
    extra[dim] = size - t.shape[dim]
    return torch.cat([t, torch.zeros(extra, dtype=t.dtype, device=t.device)], dim=dim)


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    return (t.to(torch.float32) * factor).to(t.dtype)


def _pad_heads(sd: dict[str, torch.Tensor], p: str, a: BlockAlignment, head_dim: int) -> None:
    rows = a.padded_heads * head_dim
    s = a.head_scale
    for n in ("q", "k", "v"):
        sd[f"{p}self_attn.{n}.weight"] = _pad(sd[f"{p}self_attn.{n}.weight"], 0, rows)
        sd[f"{p}self_attn.{n}.bias"] = _pad(sd[f"{p}self_attn.{n}.bias"], 0, rows)
    sd[f"{p}self_attn.o.weight"] = _pad(sd[f"{p}self_attn.o.weight"], 1, rows)
    for n in _QK:  # padded rows are zero, so scaling the whole tensor scales the real rows only
        scale_key = f"{p}self_attn.{n}.scale_weight"
        if scale_key in sd:  # fp8_scaled: the real weight is weight * scale_weight; the fp8 bytes stay as stored
            sd[scale_key] = _scaled(sd[scale_key], s)
        else:
            sd[f"{p}self_attn.{n}.weight"] = _scaled(sd[f"{p}self_attn.{n}.weight"], s)
        sd[f"{p}self_attn.{n}.bias"] = _scaled(sd[f"{p}self_attn.{n}.bias"], s)
        norm = f"{p}self_attn.norm_{n}.weight"
        sd[norm] = _pad(_scaled(sd[norm], 1.0 / s), 0, rows)


def _pad_ffn(sd: dict[str, torch.Tensor], p: str, a: BlockAlignment) -> None:
    sd[f"{p}ffn.0.weight"] = _pad(sd[f"{p}ffn.0.weight"], 0, a.padded_ffn)
    sd[f"{p}ffn.0.bias"] = _pad(sd[f"{p}ffn.0.bias"], 0, a.padded_ffn)
    sd[f"{p}ffn.2.weight"] = _pad(sd[f"{p}ffn.2.weight"], 1, a.padded_ffn)


def pad_state_dict(sd: dict[str, torch.Tensor], meta: PrunedWanMeta, multiple: int = TENSOR_CORE_MULTIPLE,
                   source: str = "model") -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """(state dict, build metadata) with every block's widths on the grain, computing the same function.

    ``sd`` uses original keys, as stored (fp8 stays fp8; an fp8_scaled file's ``<module>.scale_weight`` beside its
    weight). Returns ``sd`` and ``meta`` themselves when every width is already on the grain; otherwise a new dict
    (tensors not padded are shared) and the metadata to build the model with (``build_meta``).
    """
    unscalable = unscalable_blocks(meta.num_blocks, lambda k: sd[k].dtype,
                                   lambda k: any(k.removesuffix("weight") + s in sd
                                                 for s in ("scale_weight", "weight_scale")))
    plan = alignment_plan(meta, multiple, unscalable)
    if all(a.padded_heads == a.heads and a.padded_ffn == a.ffn for a in plan):
        return sd, meta
    out = dict(sd)
    for i, a in enumerate(plan):
        p = f"blocks.{i}."
        if a.padded_heads != a.heads:
            _pad_heads(out, p, a, meta.dims.head_dim)
        if a.padded_ffn != a.ffn:
            _pad_ffn(out, p, a)
    kept_heads = sorted(i for i in unscalable if alignment_plan(meta, multiple)[i].padded_heads != plan[i].heads)
    if kept_heads:
        logger.warning("PARE: %s: blocks %s keep self-attention widths off the %d grain: their q/k weights are fp8 "
                       "without scales, which cannot be rescaled exactly for padded heads", source, kept_heads,
                       multiple)
    padded = [f"{i}: heads {a.heads}->{a.padded_heads}, ffn {a.ffn}->{a.padded_ffn}" for i, a in enumerate(plan)
              if (a.heads, a.ffn) != (a.padded_heads, a.padded_ffn)]
    logger.info("PARE: %s: zero-padded %d block(s) to multiples of %d for tensor cores (exact; compute is "
                "reported at the stored widths): %s", source, len(padded), multiple,
                "; ".join(padded[:4]) + ("; ..." if len(padded) > 4 else ""))
    return out, build_meta(meta, plan)


# -- LoRA -----------------------------------------------------------------------------------------------------

def _pad_patch(p: LoraPatch, local: str, rows: int | None, s: float, ffn: int | None) -> LoraPatch:
    """One sliced patch padded like the weights it lands on (zeros where the weights are zero padding)."""
    def up_rows(t):
        return None if t is None else _pad(t, 0, rows)

    if rows is not None and local in ("self_attn.q", "self_attn.k", "self_attn.v"):
        if local == "self_attn.v":
            return replace(p, up=up_rows(p.up), diff=up_rows(p.diff), diff_b=up_rows(p.diff_b))
        # The real q/k rows were scaled by s, so their deltas are too: a low-rank pair through its alpha (ComfyUI
        # multiplies up @ down by strength * alpha / rank, so the factors stay as trained), full deltas directly.
        alpha = None if p.up is None else (p.alpha if p.alpha is not None else float(p.down.shape[0])) * s
        return replace(p, up=up_rows(p.up), alpha=alpha if p.up is not None else p.alpha,
                       diff=up_rows(None if p.diff is None else _scaled(p.diff, s)),
                       diff_b=up_rows(None if p.diff_b is None else _scaled(p.diff_b, s)))
    if rows is not None and local in ("self_attn.norm_q", "self_attn.norm_k"):
        return replace(p, diff=up_rows(None if p.diff is None else _scaled(p.diff, 1.0 / s)))
    if rows is not None and local == "self_attn.o":
        return replace(p, down=None if p.down is None else _pad(p.down, 1, rows),
                       diff=None if p.diff is None else _pad(p.diff, 1, rows))
    if ffn is not None and local == "ffn.0":
        return replace(p, up=None if p.up is None else _pad(p.up, 0, ffn),
                       diff=None if p.diff is None else _pad(p.diff, 0, ffn),
                       diff_b=None if p.diff_b is None else _pad(p.diff_b, 0, ffn))
    if ffn is not None and local == "ffn.2":
        return replace(p, down=None if p.down is None else _pad(p.down, 1, ffn),
                       diff=None if p.diff is None else _pad(p.diff, 1, ffn))
    return p


def pad_lora(sliced: ParsedLora, meta: PrunedWanMeta, model_shapes: Mapping[str, tuple[int, ...]],
             prefix: str = "") -> ParsedLora:
    """A LoRA sliced to ``meta``'s widths (``lora.slice_lora``), padded to the loaded model's widths.

    The padded widths are read from the model's own shapes (``prefix`` + original key), so this follows whatever
    the loader built; a model at the stored widths gets ``sliced`` back unchanged.
    """
    hd = meta.dims.head_dim
    patches: dict[str, LoraPatch] = {}
    for module, p in sliced.patches.items():
        i, local = split_block(module)
        if i is not None and (local.startswith("self_attn.") or local.startswith("ffn.")):
            b = meta.blocks[i]
            q_rows = model_shapes.get(f"{prefix}blocks.{i}.self_attn.q.weight", (b.num_heads * hd,))[0]
            ffn = model_shapes.get(f"{prefix}blocks.{i}.ffn.0.weight", (b.ffn_dim,))[0]
            rows = q_rows if q_rows != b.num_heads * hd else None
            s = math.sqrt(q_rows / (b.num_heads * hd))
            p = _pad_patch(p, local, rows, s, ffn if ffn != b.ffn_dim else None)
        patches[module] = p
    return replace(sliced, patches=patches)


# -- plans ----------------------------------------------------------------------------------------------------

def _fill(chosen: tuple[int, ...], available: tuple[int, ...], count: int) -> tuple[int, ...]:
    """``chosen`` plus the lowest-numbered ``available`` indices not in it, up to ``count`` in all."""
    have = set(chosen)
    extra = [j for j in available if j not in have][: max(0, count - len(chosen))]
    return tuple(sorted((*chosen, *extra)))


def align_plan(plan: PrunePlan, meta: PrunedWanMeta, multiple: int = TENSOR_CORE_MULTIPLE) -> PrunePlan:
    """``plan`` (for a model described by ``meta``) with each block's widths rounded *up* to the grain.

    Every index the plan keeps stays kept; the rounding adds the lowest-numbered heads / neurons the plan drops
    (give the plan multiples of 64 to choose them yourself). A width that cannot grow to the grain (the input
    block has fewer) is left as it is: the loader pads it with zeros.
    """
    if len(plan.blocks) != meta.num_blocks:
        return plan  # prune_file reports the mismatch with its own error
    hd = meta.dims.head_dim
    blocks = []
    for b, width in zip(plan.blocks, meta.blocks):
        heads, ffn = b.heads, b.ffn
        if heads is not None:
            want = round_up(len(heads), head_grain(hd, multiple))
            if want <= width.num_heads:
                heads = _fill(heads, width.heads, want)
        if ffn is not None:
            want = round_up(len(ffn), multiple)
            if want <= width.ffn_dim:
                ffn = _fill(ffn, width.ffn, want)
        blocks.append(BlockPlan(heads, ffn))
    return replace(plan, blocks=tuple(blocks))
