"""Stage 2's pieces on tiny models: gates, budget term, gated forward, threshold calibration, static baseline."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_pare.compute import routed_fraction
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.router import BlockRouter, RoutingPolicy, decide
from comfyui_pare.wan import WanDims
from training.gates import (
    compute_fraction,
    expected_compute_fraction,
    logistic_noise,
    normalized_costs,
    straight_through_gates,
)
from training.model import WanTransformer
from training.route_eval import best_contiguous_skip, calibrate_threshold, static_baseline
from training.routed import GatedWan, RoutedVelocity, block_costs, initial_bias, pin_mask, router_spec_for
from training.tiny import random_wan_state_dict

DIMS = WanDims(dim=64, num_heads=4, ffn_dim=128, num_layers=5, text_dim=32)


@pytest.fixture(scope="module")
def student() -> WanTransformer:
    meta = PrunedWanMeta.teacher(DIMS)
    return WanTransformer.from_state_dict(random_wan_state_dict(DIMS, seed=3), meta)


def inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 2, 6, 6, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, 7, DIMS.text_dim, generator=g))


def test_gates_are_hard_forward_and_soft_backward():
    logits = torch.tensor([[-2.0, -0.1, 0.3, 4.0]], requires_grad=True)
    noise = torch.tensor([[2.5, 0.0, -1.0, 0.0]])
    tau = 0.7
    gates = straight_through_gates(logits, tau, noise)
    assert gates.tolist() == [[1.0, 0.0, 0.0, 1.0]]  # sign of logit + noise
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    (gates * w).sum().backward()
    s = [1 / (1 + math.exp(-(z / tau))) for z in (0.5, -0.1, -0.7, 4.0)]
    want = [wi * si * (1 - si) / tau for wi, si in zip(w[0].tolist(), s)]
    assert torch.allclose(logits.grad, torch.tensor([want]), atol=1e-6)


def test_pinned_gates_are_one_without_gradient():
    logits = torch.full((2, 4), -3.0, requires_grad=True)
    gates = straight_through_gates(logits, 1.0, None, torch.tensor([True, False, False, True]))
    assert gates.tolist() == [[1.0, 0.0, 0.0, 1.0]] * 2
    gates.sum().backward()
    assert logits.grad[:, [0, 3]].abs().max() == 0 and logits.grad[:, [1, 2]].abs().min() > 0


def test_logistic_noise_makes_the_gate_run_with_probability_sigmoid_logit():
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0]).expand(40000, -1)
    noise = logistic_noise(logits.shape, torch.Generator().manual_seed(1))
    rate = straight_through_gates(logits, 0.5, noise).mean(dim=0)
    assert torch.allclose(rate, torch.sigmoid(logits[0]), atol=0.01), rate


def test_compute_fraction_matches_the_compute_module_and_counts_pinned_blocks():
    meta = PrunedWanMeta.teacher(DIMS)
    raw = block_costs(meta, tokens=72, text_tokens=7)
    costs = normalized_costs(raw, DIMS.num_layers)
    run = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert math.isclose(float(compute_fraction(run.float(), costs)), routed_fraction(run, raw), rel_tol=1e-6)
    pinned = torch.tensor([True, False, False, False, True])
    big = torch.tensor([[-50.0, 50.0, -50.0, 50.0, -50.0]])
    # pinned blocks cost even though their logits say skip
    expect = routed_fraction(torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool), raw)
    assert math.isclose(float(expected_compute_fraction(big, costs, pinned)), expect, rel_tol=1e-6)


def test_initial_bias_starts_at_the_budget():
    costs = normalized_costs([1.0, 2.0, 2.0, 3.0, 1.0], 5)
    pinned = torch.tensor([True, False, False, False, False])
    bias = initial_bias(5, 0.6, costs, pinned)
    assert math.isclose(float(expected_compute_fraction(bias[None], costs, pinned)), 0.6, rel_tol=1e-5)
    ranked = initial_bias(5, 0.6, costs, pinned, contribution=torch.tensor([9.0, 0.1, 0.5, 0.3, 0.2]))
    assert ranked[2] > ranked[3] > ranked[4] > ranked[1]


def test_gated_forward_equals_real_block_skipping(student):
    x, t, ctx = inputs()
    n = DIMS.num_layers
    spec = router_spec_for(student.meta, hidden=8)
    # Router logits +-30 per row: hard decisions that differ between the rows of the batch.
    table = torch.tensor([[30.0, -30, 30, 30, -30], [30, 30, -30, -30, 30], [-30, 30, 30, 30, 30]])
    mask = table > 0

    class RowRouter(BlockRouter):
        def forward(self, timestep, tokens, text=None):
            return table

    gated = GatedWan(student, RowRouter(spec), torch.zeros(n, dtype=torch.bool))
    with torch.no_grad():
        v, logits, gates = gated(x, t, ctx, tau=1.0, noise=None)
        assert torch.equal(gates.bool(), mask)
        skipped = student(x, t, ctx, block_mask=mask)
        full = student(x, t, ctx)
    assert torch.allclose(v, skipped, atol=2e-5, rtol=1e-4)
    assert (v - full).abs().max() > 1e-2  # skipping changed the output: the comparison above is not vacuous


def test_routed_velocity_decides_as_the_router_policy(student):
    x, t, ctx = inputs(seed=5)
    spec = router_spec_for(student.meta, hidden=8)
    router = BlockRouter(spec, init_bias=torch.tensor([0.5, -1.0, 2.0, -0.2, 1.0]))
    torch.nn.init.normal_(router.fc2.weight, std=0.5)  # input-dependent logits
    policy = RoutingPolicy(threshold=0.45, pin_first=1)
    rv = RoutedVelocity(student, router, policy)
    v = rv(x, t, ctx)
    logits = router(t, student.patch_embed(x), None)
    mask = decide(logits, policy)
    assert torch.equal(rv.masks[0], mask)
    assert torch.equal(v, student(x, t, ctx, block_mask=mask))


def _fraction_at(thr: float, logits, costs, pinned) -> float:
    run = (torch.sigmoid(logits) > thr) | pinned
    return float(compute_fraction(run.float(), costs))


def test_calibrated_threshold_is_the_best_achievable_and_keeps_half_when_on_budget():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g) * 2
    costs = normalized_costs([1.0, 2.0, 1.0, 3.0, 1.0, 2.0], 6)
    pinned = pin_mask(6, 1, 1)
    for budget in (0.45, 0.6, 0.8):
        thr = calibrate_threshold(logits, costs, pinned, budget)
        got = abs(_fraction_at(thr, logits, costs, pinned) - budget)
        grid = min(abs(_fraction_at(float(q), logits, costs, pinned) - budget) for q in torch.linspace(0, 1, 4001))
        assert got <= grid + 1e-9, (budget, thr)
    on_budget = _fraction_at(0.5, logits, costs, pinned)
    assert calibrate_threshold(logits, costs, pinned, on_budget) == 0.5


def test_best_contiguous_skip_by_brute_force():
    contribution = torch.tensor([[0.9, 0.5, 0.1, 0.2, 0.3, 0.8, 0.9],
                                 [0.9, 0.4, 0.2, 0.1, 0.4, 0.6, 0.9]])
    costs = normalized_costs([1.0] * 7, 7)
    pinned = pin_mask(7, 1, 1)
    best = best_contiguous_skip(contribution, costs, pinned, target=4 / 7)
    assert (best.first, best.last) == (2, 4) and best.schedule == "2-4@0.0-1.0"
    assert best.mask(7).tolist() == [True, True, False, False, False, True, True]
    assert math.isclose(best.fraction, 4 / 7, rel_tol=1e-6)
    # A budget that only a one-block skip meets; pinned blocks are never skipped even when they contribute least.
    cheap_ends = torch.tensor([0.0, 0.5, 0.4, 0.3, 0.6, 0.7, 0.0])
    one = best_contiguous_skip(cheap_ends, costs, pinned, target=0.85)
    assert (one.first, one.last) == (3, 3)
    with pytest.raises(ValueError, match="no contiguous skip"):
        best_contiguous_skip(cheap_ends, costs, pin_mask(7, 3, 4), target=0.5)


def test_a_router_that_skips_less_than_one_block_has_no_static_baseline():
    """A high budget can leave the router running (nearly) every block: no contiguous skip spends that much, and the
    end-of-run evaluation reports no static baseline instead of failing after the whole run."""
    costs = normalized_costs([1.0] * 7, 7)
    contribution = torch.tensor([0.0, 0.5, 0.4, 0.3, 0.6, 0.7, 0.0])
    assert static_baseline(contribution, costs, pin_mask(7, 1, 1), target=1.0) is None
    assert static_baseline(contribution, costs, pin_mask(7, 1, 1), target=0.85) == best_contiguous_skip(
        contribution, costs, pin_mask(7, 1, 1), target=0.85)
    with pytest.raises(ValueError, match="blocks, the model has 7"):  # other errors still raise
        static_baseline(contribution[:5], costs, pin_mask(7, 1, 1), target=0.5)
