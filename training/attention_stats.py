"""The intra-slice attention ratio of each head, estimated in bounded memory.

For a query token in latent frame f, the ratio is the softmax attention mass it puts on keys of frame f. At real
sizes the attention matrix does not fit (75,600^2 per head at 720p), so ``intra_slice_ratio`` takes a random
subset of query rows, computes each row exactly, and streams the keys in chunks with a running log-sum-exp (the
same rescaling flash attention uses): memory O(heads x rows x chunk). ``intra_slice_ratio_dense`` is the
textbook full-softmax reference for small inputs.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange


def frame_of_tokens(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """Latent frame index of each token of a (frames, rows, columns) grid flattened frame-major, [L] long."""
    f, h, w = grid
    return torch.arange(f, device=device).repeat_interleave(h * w)


def sample_rows(length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct query rows drawn uniformly (all rows, in order, when count >= length)."""
    if count >= length:
        return torch.arange(length)
    return torch.randperm(length, generator=generator)[:count].sort().values


def intra_slice_ratio(q: torch.Tensor, k: torch.Tensor, frames: torch.Tensor, rows: torch.Tensor,
                      key_chunk: int = 4096) -> torch.Tensor:
    """Exact per-row ratios [H, R] for the query rows ``rows``.

    q: [H, R, d] queries of those rows (after norm and RoPE); k: [H, L, d] all keys; frames: [L] frame of each
    token. Scaled dot-product logits as in attention (1/sqrt(d)), in float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q.float() * scale
    qf = frames[rows.to(frames.device)]  # [R]
    lse_all = torch.full(q.shape[:2], -math.inf, device=q.device)
    lse_same = torch.full(q.shape[:2], -math.inf, device=q.device)
    for start in range(0, k.shape[1], key_chunk):
        kc = k[:, start:start + key_chunk].float()
        logits = torch.einsum("hrd,hcd->hrc", q, kc)
        same = qf[:, None] == frames[start:start + kc.shape[1]][None, :]  # [R, C]
        lse_all = torch.logaddexp(lse_all, torch.logsumexp(logits, dim=-1))
        lse_same = torch.logaddexp(lse_same, torch.logsumexp(logits.masked_fill(~same, -math.inf), dim=-1))
    return torch.exp(lse_same - lse_all)


def intra_slice_ratio_dense(q: torch.Tensor, k: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Reference: the full softmax [H, L, L], then the same-frame mass of every row, [H, L]."""
    attn = torch.softmax(torch.einsum("hqd,hkd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1]), dim=-1)
    same = frames[:, None] == frames[None, :]
    return (attn * same).sum(-1)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads * d] -> [B, heads, L, d]."""
    return rearrange(t, "b l (h d) -> b h l d", h=heads)
