"""Compute accounting: multiply-accumulates (MACs) of a Wan forward, per block and per part.

"Compute" (docs/method.md, Conventions) is the MACs of the transformer blocks for one denoising step
(one forward, batch 1) at a given token count, split into attention core, self-attention projections,
cross-attention and FFN. Embeddings and head are reported separately by ``embed_head_macs``. Norms,
RoPE, softmax, modulation and residuals are elementwise and not counted. These numbers weight the
router's budget, so a skipped wide block counts for more than a skipped narrow one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from .model_family import FAMILIES, WanFamily
from .pruned import PrunedWanMeta
from .wan import CLIP_DIM, CLIP_TOKENS, FREQ_DIM, TEXT_TOKENS, BlockWidth, WanDims

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockMacs:
    """MACs of one transformer block for one forward, batch 1."""

    self_attn_proj: int  # q, k, v, o of self-attention
    attn_core: int  # QK^T and attention x V of self-attention
    cross_attn: int  # cross-attention to text (and CLIP image tokens for I2V), projections and core
    ffn: int

    @property
    def total(self) -> int:
        return self.self_attn_proj + self.attn_core + self.cross_attn + self.ffn

    def __add__(self, other: "BlockMacs") -> "BlockMacs":
        if not isinstance(other, BlockMacs):
            return NotImplemented
        return BlockMacs(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def shares(self) -> dict[str, float]:
        """Each part's fraction of ``total``."""
        total = self.total
        return {f.name: (getattr(self, f.name) / total if total else 0.0) for f in fields(self)}


def sum_macs(parts: Sequence[BlockMacs]) -> BlockMacs:
    """Part-wise sum over blocks (e.g. the whole model's block compute)."""
    out = BlockMacs(0, 0, 0, 0)
    for p in parts:
        out = out + p
    return out


def block_macs(dims: WanDims, width: BlockWidth, tokens: int, text_tokens: int = TEXT_TOKENS) -> BlockMacs:
    """MACs of one block with the given kept heads / FFN neurons at ``tokens`` video tokens."""
    _check_tokens(tokens, text_tokens)
    d = dims.dim
    inner = width.num_heads * dims.head_dim
    self_attn_proj = tokens * d * inner * 4  # q, k, v: d -> inner; o: inner -> d
    attn_core = 2 * tokens * tokens * inner  # QK^T and AV, summed over the kept heads
    # Cross-attention keeps full width (pruning touches only self-attention and FFN).
    cross_attn = 2 * tokens * d * d + 2 * text_tokens * d * d + 2 * tokens * text_tokens * d
    if dims.variant == "i2v":
        cross_attn += 2 * CLIP_TOKENS * d * d + 2 * tokens * CLIP_TOKENS * d
    ffn = 2 * tokens * d * width.ffn_dim
    return BlockMacs(self_attn_proj=self_attn_proj, attn_core=attn_core, cross_attn=cross_attn, ffn=ffn)


def model_block_macs(meta: PrunedWanMeta, tokens: int, text_tokens: int = TEXT_TOKENS) -> list[BlockMacs]:
    """``block_macs`` of every block of a (pruned or teacher) model, in block order."""
    return [block_macs(meta.dims, w, tokens, text_tokens) for w in meta.blocks]


def embed_head_macs(dims: WanDims, tokens: int, text_tokens: int = TEXT_TOKENS) -> int:
    """MACs outside the blocks: patch embedding, text / time embeddings, head (and the I2V CLIP projection)."""
    _check_tokens(tokens, text_tokens)
    d = dims.dim
    volume = dims.spec.patch_volume
    patch_embed = tokens * d * dims.in_dim * volume
    text_embed = text_tokens * (dims.text_dim * d + d * d)
    time_embed = FREQ_DIM * d + d * d + d * 6 * d  # time_embedding.0/.2 and time_projection, one timestep
    head = tokens * d * dims.out_dim * volume
    total = patch_embed + text_embed + time_embed + head
    if dims.vace_layers:  # the VACE stream: its patch embedding and full-width blocks (hint projections included)
        full = BlockWidth.full(dims)
        total += tokens * d * dims.vace_in_dim * volume
        total += dims.vace_layers * (block_macs(dims, full, tokens, text_tokens).total + tokens * d * d) + tokens * d * d
    if dims.variant == "i2v":
        total += CLIP_TOKENS * (CLIP_DIM * CLIP_DIM + CLIP_DIM * d)
    return total


def tokens_for(frames: int, height: int, width: int, family: WanFamily | WanDims | None = None) -> int:
    """Video tokens of a ``frames`` x ``height`` x ``width`` (pixels) generation of a model of ``family`` (a family,
    or the dims that name one; default Wan2.1 T2V): its VAE's stride and the patch, as ComfyUI's Wan latent nodes
    and patch embedding make them (``WanFamily.tokens_for``)."""
    if isinstance(family, WanDims):
        family = family.spec
    return (family or FAMILIES["wan2.1-t2v"]).tokens_for(frames, height, width)


def routed_fraction(executed: torch.Tensor | np.ndarray | Sequence, costs: Sequence[int]) -> float:
    """Fraction of the block compute actually executed, weighted by each block's cost.

    ``executed`` is boolean [steps or samples, num_blocks] (or [num_blocks] for one step); ``costs`` is one
    number per block, e.g. ``[m.total for m in model_block_macs(meta, tokens)]``.
    """
    ex = torch.as_tensor(np.asarray(executed.detach().cpu() if isinstance(executed, torch.Tensor) else executed))
    if ex.ndim == 1:
        ex = ex[None]
    c = torch.as_tensor(list(costs), dtype=torch.float64)
    if ex.ndim != 2 or ex.shape[1] != c.numel():
        raise ValueError(f"executed must be [steps, {c.numel()}] to match the {c.numel()} block costs, got {list(ex.shape)}")
    if ex.shape[0] == 0:
        raise ValueError("executed has no steps")
    if bool((c < 0).any()) or float(c.sum()) <= 0:
        raise ValueError("block costs must be non-negative with a positive total")
    done = (ex.to(torch.float64) * c).sum()
    return float(done / (c.sum() * ex.shape[0]))


def _check_tokens(tokens: int, text_tokens: int) -> None:
    if int(tokens) < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if int(text_tokens) < 0:
        raise ValueError(f"text_tokens must be non-negative, got {text_tokens}")
