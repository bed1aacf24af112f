"""PARE Apply Router's budget mode through a real ComfyUI server: the budget becomes the threshold calibrated for it
(stored in the router file), and the node warns (log and routing report) outside the validated budgets and for a
file without calibration."""

from __future__ import annotations

import pytest
from conftest import read_latent
from graphs import out, pare_loader, routed_model_id, sample_graph, with_report
from helpers import BOUNDARY, EARLY, LATE, SPEC, N

from comfyui_pare.router import BlockRouter, save_router
from comfyui_pare.router_budget import BudgetCalibration, read_budget_calibration, write_budget_calibration
from scripts import tiny_assets

pytestmark = pytest.mark.comfy
CALIBRATED = "r_budget_calibrated.safetensors"
UNCALIBRATED = "r_budget_plain.safetensors"
# Validated 0.5-0.7; 0.8 is calibrated but failed validation; 0.3 lies below the calibrated range.
CAL = BudgetCalibration(budgets=(0.4, 0.5, 0.6, 0.7, 0.8), thresholds=(0.9, 0.7, 0.6, 0.4, 0.2),
                        spent=(0.4, 0.5, 0.6, 0.7, 0.8), held_out_spent=(0.45, 0.5, 0.6, 0.7, 0.9),
                        validated_budgets=(0.5, 0.6, 0.7), pin_first=0, pin_last=0)


@pytest.fixture(scope="module")
def budget_routers(comfy):
    folder = comfy.base / "models" / "pare_routers"
    folder.mkdir(parents=True, exist_ok=True)
    save_router(folder / UNCALIBRATED, BlockRouter.timestep_switch(SPEC, BOUNDARY, EARLY, LATE))
    write_budget_calibration(folder / UNCALIBRATED, CAL, out=folder / CALIBRATED)
    assert read_budget_calibration(folder / CALIBRATED) == CAL and read_budget_calibration(folder / UNCALIBRATED) is None
    return comfy


def run(server, router: str, **apply):
    def patch(g, model):
        r = g.add("PARELoadRouter", router_name=router)
        knobs = {"budget": 1.0, "pin_first": 0, "pin_last": 0, **apply}
        return g.add("PAREApplyRouter", model=out(model), router=out(r), **knobs)

    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=3.0, steps=4, seed=5, patch_model=patch)
    _, txt = with_report(g, routed_model_id(g))
    entry = server.run(g.to_json())
    return read_latent(server.output_files(entry, save, "latents")[0]), entry["outputs"][txt]["text"][0]


def test_budget_mode_runs_the_calibrated_threshold(budget_routers):
    for budget in (0.6, 0.55):  # a calibrated budget, and one between two (interpolated threshold 0.65)
        threshold = CAL.threshold_for(budget)
        by_budget, summary = run(budget_routers, CALIBRATED, mode="budget", budget=budget)
        by_threshold, _ = run(budget_routers, CALIBRATED, mode="threshold", threshold=threshold)
        assert by_budget.equal(by_threshold), budget
        assert f"budget {budget:g} over the run: calibrated threshold {threshold:.4g}" in summary, summary
        assert "warning:" not in summary, summary


def test_budget_outside_validated_budgets_warns_in_log_and_report(budget_routers):
    for budget, clamped in ((0.8, False), (0.3, True)):
        _, summary = run(budget_routers, CALIBRATED, mode="budget", budget=budget)
        warning = [ln for ln in summary.splitlines() if ln.startswith("warning:")]
        assert len(warning) == 1, summary
        assert f"budget {budget:g} is outside the budgets this router was validated for (0.5-0.7)" in warning[0]
        assert ("outside the calibrated budgets 0.4-0.8" in warning[0]) == clamped, warning[0]
        assert f"budget {budget:g} is outside the budgets this router was validated for" in budget_routers.log_text()
    _, summary = run(budget_routers, CALIBRATED, mode="budget", budget=0.6, pin_first=1)
    assert "the budget calibration assumed pin_first=0, pin_last=0; with 1/0" in summary, summary


def test_router_without_calibration_falls_back_to_the_per_step_rule_and_says_so(budget_routers):
    latent, summary = run(budget_routers, UNCALIBRATED, mode="budget", budget=0.5)
    assert "the router file has no budget calibration, so budget 0.5 is spent at every step" in summary, summary
    assert "calibrate-router" in summary and "no budget calibration" in budget_routers.log_text()
    # every step spends exactly half of the (equal-cost) blocks: 3 of 6, on both CFG branches
    assert f"block calls executed: {4 * 3 * 2} of {4 * N * 2}" in summary, summary
