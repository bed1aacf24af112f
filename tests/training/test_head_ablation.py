"""The head-ablation diagnostic (training/toyworld/head_ablation.py): the ablation removes exactly one head's
contribution and restores the weights; the ranking comparisons count what they claim."""

from __future__ import annotations

import pytest
import torch

from comfyui_pare.pruned import PrunedWanMeta
from training.model import WanTransformer
from training.tiny import TINY_T2V, random_wan_state_dict
from training.toyworld.head_ablation import head_ablated, pair_agreement, spearman


def _inputs(dims):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, dims.in_dim, 3, 4, 4, generator=g)
    return x, torch.tensor([900.0, 250.0]), torch.randn(2, 7, dims.text_dim, generator=g)


def test_ablating_a_head_equals_zeroing_its_values_and_restores_the_weights():
    """Zeroing head h's o-projection columns must give the same model output as an independent route to 'head h adds
    nothing': zeroing its rows of the v projection (weight and bias), so its attention output is exactly zero."""
    sd = random_wan_state_dict(TINY_T2V, seed=3)
    meta = PrunedWanMeta.teacher(TINY_T2V)
    model = WanTransformer.from_state_dict(sd, meta).eval()
    x, t, ctx = _inputs(TINY_T2V)
    block, head, hd = 2, 5, TINY_T2V.dim // TINY_T2V.num_heads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(x, t, ctx)
        with head_ablated(model, block, head):
            ablated = model(x, t, ctx)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored exactly
        zero_v = dict(sd)
        rows = slice(head * hd, (head + 1) * hd)
        for name in ("weight", "bias"):
            key = f"blocks.{block}.self_attn.v.{name}"
            zero_v[key] = sd[key].clone()
            zero_v[key][rows] = 0
        reference = WanTransformer.from_state_dict(zero_v, meta).eval()(x, t, ctx)
    assert not torch.allclose(ablated, full, atol=1e-4)
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=1e-5)


def test_ablation_names_a_missing_head():
    model = WanTransformer.from_state_dict(random_wan_state_dict(TINY_T2V), PrunedWanMeta.teacher(TINY_T2V))
    with pytest.raises(IndexError, match="block 1 has 8 heads, no head at position 8"):
        with head_ablated(model, 1, 8):
            pass


def test_ranking_comparisons():
    damage = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.7, 0.1]])
    assert spearman(damage * 2 + 1, damage) == pytest.approx(1.0)
    assert spearman(-damage, damage) == pytest.approx(-1.0)
    # block 0 ordered exactly, block 1 exactly reversed: 3 of 6 within-block pairs agree
    score = torch.tensor([[9.0, 1.0, 5.0], [0.2, 0.1, 0.3]])
    assert pair_agreement(score, damage) == [3, 6]


def test_cli_names_stats_of_another_model(tmp_path):
    """Stats calibrated on another model (6 blocks x 8 heads) against the shipped 8 x 4 toy teacher: a clear error
    naming the file and both shapes, before any sampling."""
    from training.__main__ import main
    from training.calibrate import CalibrationStats

    stats = tmp_path / "other_stats.safetensors"
    CalibrationStats(torch.full((6, 8), 0.5), torch.ones(6, 8), [torch.ones(4)] * 6, torch.ones(2, 6),
                     torch.tensor([900.0, 100.0]), {"options": {"spatial_threshold": 0.7, "temporal_threshold": 0.3}}
                     ).save(stats)
    with pytest.raises(ValueError, match=r"other_stats.safetensors: head stats of shape \(6, 8\) .* 8 blocks x 4 heads"):
        main(["toyworld", "head-ablation", "--stats", str(stats), "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
