"""The router's budget calibration (``comfyui_pare.router_budget``, ``training.calibrate_router``) and calibrate's
training-free static schedules (``training.schedule_suggest``), without ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from comfyui_pare.errors import PareError, PareFormatError
from comfyui_pare.router import (
    BlockRouter,
    RouterSpec,
    RoutingPolicy,
    decide,
    load_router,
    read_router_spec,
    save_router,
)
from comfyui_pare.router_budget import BUDGET_KEY, BudgetCalibration, read_budget_calibration, write_budget_calibration
from comfyui_pare.safetensors_io import load_tensors, save_atomic
from comfyui_pare.schedule import parse_schedule
from training.calibrate_router import budget_calibration, calibrate_family, parse_budgets, spent
from training.sampling import flow_sigmas
from training.schedule_suggest import percent_of_sigma, phase_bounds, step_masks, suggest

N = 8
COSTS = torch.tensor([1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 1.0, 1.0])
PINNED = torch.tensor([True] + [False] * 6 + [True])
BUDGETS = tuple(round(0.3 + 0.05 * k, 2) for k in range(15))


def schedule_logits(seed: int, inputs: int = 12, steps: int = 20, content_seed: int = 100) -> torch.Tensor:
    """Logits of a router that prefers some blocks early and others late (``seed``), and varies a little with the
    input (``content_seed``: other inputs)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(1, 0, steps)[None, :, None]  # [1, steps, 1]
    early, late = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    content = 0.3 * torch.randn(inputs, 1, N, generator=torch.Generator().manual_seed(content_seed))
    return (t * early + (1 - t) * late + content).reshape(-1, N) * 2


def test_thresholds_are_monotone_and_spend_each_budget_on_the_calibration_set():
    logits = schedule_logits(0)
    thresholds, spends = calibrate_family(logits, COSTS, PINNED, BUDGETS)
    assert all(a >= b for a, b in zip(thresholds, thresholds[1:]))  # more budget never means a higher threshold
    assert all(a <= b + 1e-12 for a, b in zip(spends, spends[1:]))
    pinned_share = float(COSTS[PINNED].sum() / COSTS.sum())
    for b, t, s in zip(BUDGETS, thresholds, spends):
        assert s == pytest.approx(spent(logits, COSTS, PINNED, t))
        if b >= pinned_share:  # below what the pinned blocks cost alone no threshold can go
            assert abs(s - b) <= 0.03, (b, t, s)
    # spent() is what the node's decide() does with that threshold
    t = thresholds[BUDGETS.index(0.6)]
    run = decide(logits, RoutingPolicy(threshold=t, pin_first=1, pin_last=1))
    assert float((run.double() * COSTS.double() / COSTS.sum()).sum(1).mean()) == pytest.approx(spends[6])


def test_held_out_validation_marks_only_budgets_spent_within_tolerance():
    calib, held = schedule_logits(0, content_seed=1), schedule_logits(0, content_seed=2)
    budgets = (0.2, *BUDGETS)
    cal = budget_calibration(calib, held, COSTS, PINNED, budgets, 1, 1, "abc", "test")
    assert set(cal.validated_budgets) == {b for b, h in zip(cal.budgets, cal.held_out_spent) if abs(h - b) <= 0.03}
    assert 0.6 in cal.validated_budgets and 0.2 not in cal.validated_budgets  # the pinned blocks alone cost 0.25
    shifted = budget_calibration(calib, calib + 1.5, COSTS, PINNED, budgets, 1, 1, "abc", "test")  # held out runs more
    assert len(shifted.validated_budgets) < len(cal.validated_budgets)


def test_threshold_interpolates_between_calibrated_budgets_and_clamps_outside():
    cal = BudgetCalibration(budgets=(0.4, 0.6, 0.8), thresholds=(0.8, 0.6, 0.3), spent=(0.4, 0.6, 0.8),
                            validated_budgets=(0.4, 0.6))
    assert cal.threshold_for(0.5) == pytest.approx(0.7) and cal.threshold_for(0.7) == pytest.approx(0.45)
    assert cal.threshold_for(0.1) == 0.8 and cal.threshold_for(0.95) == 0.3
    assert cal.is_validated(0.5) and cal.is_validated(0.6) and not cal.is_validated(0.7)
    assert not cal.is_validated(0.3) and cal.describe_validated() == "0.4-0.6"
    assert cal.is_calibrated(0.8) and not cal.is_calibrated(0.85)


def test_metadata_round_trip_keeps_the_router_bit_for_bit(tmp_path):
    spec = RouterSpec(num_blocks=N, dim=16, hidden=8, model_fingerprint="f00d", default_threshold=0.42,
                      train_budget=0.7)
    router = BlockRouter(spec)
    path = tmp_path / "r.safetensors"
    save_router(path, router)
    assert read_budget_calibration(path) is None
    thresholds, spends = calibrate_family(schedule_logits(1), COSTS, PINNED, BUDGETS)
    cal = BudgetCalibration(budgets=BUDGETS, thresholds=tuple(thresholds), spent=tuple(spends),
                            held_out_spent=tuple(spends), validated_budgets=BUDGETS[2:], model_fingerprint="f00d",
                            inputs=240, note="unit test")
    write_budget_calibration(path, cal)
    assert read_budget_calibration(path) == cal
    assert read_router_spec(path) == spec
    before = {k: v.detach() for k, v in router.state_dict().items()}
    after = load_file(str(path))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_router(path).spec == spec
    write_budget_calibration(path, None)
    assert read_budget_calibration(path) is None and read_router_spec(path) == spec


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(thresholds=[0.2, 0.5] + d["thresholds"][2:]), "thresholds"),
    (lambda d: d.update(budgets=d["budgets"][::-1]), "budgets"),
    (lambda d: d.update(spent=d["spent"][:-1]), "spent"),
    (lambda d: d.update(validated_budgets=[0.33]), "validated_budgets"),
    (lambda d: d.update(thresholds=[1.5] * len(d["thresholds"])), "thresholds"),
    (lambda d: d.update(format_version=9), "format_version"),
    (lambda d: d.update(pin_first="one"), "pin_first"),
])
def test_malformed_calibration_names_the_file_and_field(tmp_path, mutate, field):
    path = tmp_path / "r.safetensors"
    save_router(path, BlockRouter(RouterSpec(num_blocks=2, dim=4, hidden=2)))
    good = BudgetCalibration(budgets=(0.5, 1.0), thresholds=(0.6, 0.1), spent=(0.5, 1.0))
    body = good.to_json()
    mutate(body)
    tensors, meta = load_tensors(path)
    save_atomic(path, tensors, {**meta, BUDGET_KEY: json.dumps(body)})
    with pytest.raises(PareFormatError, match=field) as err:
        read_budget_calibration(path)
    assert str(path) in str(err.value)


def test_parse_budgets():
    assert parse_budgets("0.4:0.6:0.1") == (0.4, 0.5, 0.6)
    assert parse_budgets("0.5,1") == (0.5, 1.0)
    with pytest.raises(PareError, match="--budgets"):
        parse_budgets("0.6,0.5")


def test_calibrate_suggestions_parse_and_spend_at_most_their_budget():
    sigmas = [float(s) for s in flow_sigmas(5, 3.0)[:-1]]
    gen = torch.Generator().manual_seed(0)
    contribution = torch.rand(5, N, generator=gen)
    contribution[:, 3] = 0.01  # block 3 barely changes its input: skipped first, at every step
    for b in (0.5, 0.6, 0.7, 0.8):
        s = suggest(contribution, sigmas, 3.0, b)
        ranges = parse_schedule(s.schedule, N)  # the node's parser accepts it
        assert s.compute <= b + 1e-9 and s.compute > b - 1 / N
        assert all(0 < r.first_block and r.last_block < N - 1 for r in ranges)  # first and last block kept
        assert any(r.first_block <= 3 <= r.last_block and (r.start_percent, r.end_percent) == (0.0, 1.0)
                   for r in ranges), s.schedule
        # at the calibration schedule's own steps the node skips exactly the suggested cells
        keep = step_masks(ranges, N, sigmas, 3.0)
        assert torch.equal(~keep, s.skipped)
    bounds = phase_bounds(sigmas, 3.0)
    assert bounds[0][0] == 0.0 and bounds[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    positions = [percent_of_sigma(s, 3.0) for s in sigmas]
    assert positions[2] == pytest.approx(0.4, abs=2e-3)
    assert all(a < p < e for p, (a, e) in zip(positions[1:], bounds[1:]))  # each timestep inside its own phase


def test_suggestions_do_not_depend_on_the_order_of_the_calibration_sigmas():
    sigmas = [0.9, 0.6, 0.3]
    contribution = torch.tensor([[1.0, 0.2, 0.9, 1.0], [1.0, 0.8, 0.1, 1.0], [1.0, 0.5, 0.5, 1.0]])
    a = suggest(contribution, sigmas, 1.0, 0.75)
    b = suggest(contribution[[2, 0, 1]], [0.3, 0.9, 0.6], 1.0, 0.75)
    assert a.schedule == b.schedule and a.compute == b.compute
    with pytest.raises(ValueError, match="distinct"):
        suggest(contribution, [0.9, 0.9, 0.3], 1.0, 0.75)
