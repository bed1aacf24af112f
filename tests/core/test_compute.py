"""Compute accounting: part shares of the real models, exact scaling with heads, token counts, a hand example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_pare.compute import (
    BlockMacs,
    block_macs,
    embed_head_macs,
    model_block_macs,
    routed_fraction,
    sum_macs,
    tokens_for,
)
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import WAN21_1_3B, WAN21_14B, BlockWidth, WanDims
from training.tiny import TINY_T2V


@pytest.mark.parametrize(
    "tokens, expected",
    [
        # (attention core, self-attn projections, cross-attn, FFN) of one 14B forward, as docs/method.md states them
        # ("Where a 14B forward spends its compute"): 32,760 tokens is 81 frames at 480p, 75,600 at 720p
        (32760, (0.52, 0.16, 0.09, 0.22)),
        (75600, (0.72, 0.10, 0.05, 0.13)),
    ],
)
def test_14b_part_shares_match_known_split(tokens, expected):
    parts = sum_macs(model_block_macs(PrunedWanMeta.teacher(WAN21_14B), tokens))
    shares = parts.shares()
    got = (shares["attn_core"], shares["self_attn_proj"], shares["cross_attn"], shares["ffn"])
    for g, e in zip(got, expected, strict=True):
        assert abs(g - e) < 0.01, (got, expected)
    assert abs(sum(shares.values()) - 1.0) < 1e-12


def test_halving_heads_halves_attention_exactly():
    full = BlockWidth.full(WAN21_14B)
    half = BlockWidth(tuple(range(0, 40, 2)), full.ffn)
    a = block_macs(WAN21_14B, full, 32760)
    b = block_macs(WAN21_14B, half, 32760)
    assert 2 * b.attn_core == a.attn_core
    assert 2 * b.self_attn_proj == a.self_attn_proj
    assert b.cross_attn == a.cross_attn and b.ffn == a.ffn


def test_ffn_scales_with_kept_neurons():
    full = BlockWidth.full(WAN21_1_3B)
    quarter = BlockWidth(full.heads, tuple(range(0, WAN21_1_3B.ffn_dim, 4)))
    assert 4 * block_macs(WAN21_1_3B, quarter, 1000).ffn == block_macs(WAN21_1_3B, full, 1000).ffn


@pytest.mark.parametrize(
    "frames, height, width, tokens",
    [
        (81, 480, 832, 32760),  # 1.3B and 14B at 480p: 21 x 30 x 52
        (81, 720, 1280, 75600),  # 14B at 720p: 21 x 45 x 80
        (1, 480, 832, 1560),
        (33, 480, 832, 9 * 1560),
        (5, 488, 840, 2 * 31 * 53),  # odd latent sizes: padded up to the patch, as ComfyUI does
    ],
)
def test_tokens_for(frames, height, width, tokens):
    assert tokens_for(frames, height, width) == tokens


def test_tokens_for_rejects_nonsense():
    with pytest.raises(ValueError, match="frames"):
        tokens_for(0, 480, 832)
    with pytest.raises(ValueError, match="smaller than one latent pixel"):
        tokens_for(81, 4, 832)


def test_hand_computed_tiny_block():
    dims = WanDims(dim=8, num_heads=2, ffn_dim=16, num_layers=1, text_dim=4)  # head_dim 4
    width = BlockWidth(heads=(1,), ffn=tuple(range(6)))  # inner 4, ffn 6
    m = block_macs(dims, width, tokens=3, text_tokens=2)
    assert m == BlockMacs(
        self_attn_proj=3 * 8 * 4 * 4,  # 384
        attn_core=2 * 3 * 3 * 4,  # 72
        cross_attn=2 * 3 * 64 + 2 * 2 * 64 + 2 * 3 * 2 * 8,  # 384 + 256 + 96
        ffn=2 * 3 * 8 * 6,  # 288
    )
    assert m.total == 384 + 72 + 736 + 288
    i2v = WanDims(dim=8, num_heads=2, ffn_dim=16, num_layers=1, text_dim=4, in_dim=36, variant="i2v")
    mi = block_macs(i2v, width, tokens=3, text_tokens=2)
    assert mi.cross_attn - m.cross_attn == 2 * 257 * 64 + 2 * 3 * 257 * 8
    assert (mi.attn_core, mi.self_attn_proj, mi.ffn) == (m.attn_core, m.self_attn_proj, m.ffn)


def test_embed_head_macs_hand_computed():
    dims = WanDims(dim=8, num_heads=2, ffn_dim=16, num_layers=1, text_dim=4)
    patch = 3 * 8 * 16 * 4
    text = 2 * (4 * 8 + 8 * 8)
    time = 256 * 8 + 8 * 8 + 8 * 48
    head = 3 * 8 * 16 * 4
    assert embed_head_macs(dims, tokens=3, text_tokens=2) == patch + text + time + head


def test_model_block_macs_follows_per_block_widths():
    meta = PrunedWanMeta.teacher(TINY_T2V)
    narrow = BlockWidth(heads=(0, 1, 2, 3), ffn=tuple(range(128)))
    blocks = list(meta.blocks)
    blocks[2] = narrow
    pruned = PrunedWanMeta(TINY_T2V, tuple(blocks))
    full = model_block_macs(meta, 100, 16)
    cut = model_block_macs(pruned, 100, 16)
    assert len(cut) == TINY_T2V.num_layers
    assert [c for i, c in enumerate(cut) if i != 2] == [f for i, f in enumerate(full) if i != 2]
    assert cut[2] == block_macs(TINY_T2V, narrow, 100, 16)
    assert cut[2].total < full[2].total


def test_routed_fraction_is_cost_weighted():
    costs = [1, 3]
    assert routed_fraction(torch.tensor([[True, False], [True, True]]), costs) == pytest.approx(5 / 8)
    assert routed_fraction(np.array([[False, True]]), costs) == pytest.approx(3 / 4)
    assert routed_fraction([True, True], costs) == 1.0
    assert routed_fraction(torch.zeros(4, 2, dtype=torch.bool), costs) == 0.0


def test_routed_fraction_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="match the 3 block costs"):
        routed_fraction(torch.ones(2, 2, dtype=torch.bool), [1, 2, 3])
