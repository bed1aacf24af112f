"""Routing as sampling really runs it, through a real ComfyUI: the shift on the first run of a fresh server,
second-order samplers in the report, model calls that another node routed around."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_NODES, comfy_install, read_latent
from graphs import out, pare_loader, sample_graph
from helpers import shifted_sigma, step_sigmas

from comfyui_pare.router import BlockRouter, RouterSpec, save_router
from scripts import tiny_assets
from scripts.comfy_harness import ComfyServer

pytestmark = pytest.mark.comfy
N = tiny_assets.TINY_T2V.num_layers
SKIP_1_2 = "r_skip_1_2.safetensors"  # a constant router that skips blocks 1 and 2 (threshold 0.5)
STEPS, START = 10, 0.45  # the range '1-2@0.45-1.0'
SHIFTS = {"static": 1.5, "router": 2.5}  # neither 5 (the tests' usual) nor 8 (the file's default)


def active_steps(shift: float, range_shift: float | None = None) -> int:
    """Steps of the schedule at ``shift`` whose sigma lies in the range mapped to sigmas at ``range_shift``."""
    high = shifted_sigma(shift if range_shift is None else range_shift, 1.0 - START)
    return sum(1 for s in step_sigmas(STEPS, shift) if s <= high)


def two_branch_prompt(tag: str, seed: int) -> tuple[dict, dict[str, tuple[str, str]]]:
    """One loader feeding a static schedule (shift 1.5) and a router with start/end percent (shift 2.5).

    Returns the graph and, per branch, (save node, counts node). The block counter is inside the blocks.
    """
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=1.0, steps=STEPS, shift=SHIFTS["static"],
                           seed=seed, prefix=f"static_{tag}", patch_model=lambda g, m: g.add(
                               "PAREStaticSchedule", schedule=f"1-2@{START}-1.0",
                               model=out(g.add("PARETestCountBlocks", model=out(m), tag=f"static_{tag}"))))
    sampler = g.find("KSampler")
    branches = {"static": (save, g.add("PARETestReadCounts", samples=out(sampler), tag=f"static_{tag}"))}
    counted = g.add("PARETestCountBlocks", model=out(g.find("PARELoadPrunedWan")), tag=f"router_{tag}")
    router = g.add("PARELoadRouter", router_name=SKIP_1_2)
    routed = g.add("PAREApplyRouter", model=out(counted), router=out(router), mode="threshold", budget=1.0, threshold=0.5,
                   pin_first=0, pin_last=0, start_percent=START, end_percent=1.0)
    shifted = g.add("ModelSamplingSD3", model=out(routed), shift=SHIFTS["router"])
    k2 = g.add("KSampler", **{**g.nodes[sampler]["inputs"], "model": out(shifted)})
    branches["router"] = (g.add("SaveLatent", samples=out(k2), filename_prefix=f"router_{tag}"),
                          g.add("PARETestReadCounts", samples=out(k2), tag=f"router_{tag}"))
    return g.to_json(), branches


@pytest.mark.every_comfyui
def test_first_run_on_a_fresh_server_uses_the_sampled_shift(assets_dir, tmp_path, comfyui_version):
    expected = {name: active_steps(shift) for name, shift in SHIFTS.items()}
    # The test can fail: a range mapped with the file's default shift (8), or with the other branch's shift,
    # puts another number of steps in range.
    for name, shift in SHIFTS.items():
        wrong = {active_steps(shift, other) for other in (8.0, *SHIFTS.values()) if other != shift}
        assert 0 < expected[name] < STEPS and expected[name] not in wrong, (name, expected, wrong)
    assert expected["static"] == 5  # the example: steps 5-9 of 10 at shift 1.5

    base = tmp_path / "fresh"
    tiny_assets.install_assets(base)
    save_router(base / "models" / "pare_routers" / SKIP_1_2,
                BlockRouter.constant(RouterSpec(num_blocks=N, dim=tiny_assets.TINY_T2V.dim), [5, -5, -5, 5, 5, 5]))
    latents = {}
    install = comfy_install(comfyui_version)
    with ComfyServer(base_dir=base, comfy_dir=install.comfy_dir, extra_custom_nodes=(TEST_NODES,)) as server:
        for run in ("first", "second"):  # the second run finds the model loaded, with its patches applied
            graph, branches = two_branch_prompt(run, seed=11)
            entry = server.run(graph)
            for name, (save, counts_node) in branches.items():
                counts = {int(k): v for k, v in json.loads(entry["outputs"][counts_node]["text"][0]).items()}
                want = {b: STEPS - expected[name] if b in (1, 2) else STEPS for b in range(N)}
                assert counts == want, (run, name, counts, want)
                latents[run, name] = read_latent(server.output_files(entry, save, "latents")[0])
    for name in SHIFTS:
        assert latents["first", name].equal(latents["second", name]), name


def test_second_order_sampler_is_reported_per_step(comfy):
    """heun evaluates the model twice per step (at sigma_i and sigma_i+1); the report says so."""
    steps, shift, start = 4, 5.0, 0.5
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=1.0, steps=steps, shift=shift, seed=2,
                           sampler="heun", patch_model=lambda g, m: g.add(
                               "PAREStaticSchedule", schedule=f"1-2@{start}-1.0",
                               model=out(g.add("PARETestCountBlocks", model=out(m), tag="heun"))))
    sampler = g.find("KSampler")
    report = g.add("PARERoutingReport", model=out(g.find("PAREStaticSchedule")), samples=out(sampler))
    text = g.add("PreviewAny", source=out(report, 1))
    counts_node = g.add("PARETestReadCounts", samples=out(sampler), tag="heun")
    entry = comfy.run(g.to_json())

    sig = step_sigmas(steps, shift)
    calls = [s for i in range(steps) for s in ([sig[i], sig[i + 1]] if i + 1 < steps else [sig[i]])]
    high = shifted_sigma(shift, 1.0 - start)
    skipped = sum(1 for s in calls if s <= high)
    assert 0 < skipped < len(calls)
    counts = {int(k): v for k, v in json.loads(entry["outputs"][counts_node]["text"][0]).items()}
    assert counts == {b: len(calls) - skipped if b in (1, 2) else len(calls) for b in range(N)}
    summary = entry["outputs"][text]["text"][0]
    assert f"PARE routing: {steps} steps" in summary, summary
    assert f"sampler: {len(calls)} model evaluations over {steps} steps (up to 2 per step" in summary, summary
    assert f"block calls executed: {N * len(calls) - 2 * skipped} of {N * len(calls)}" in summary, summary


def test_calls_that_bypass_the_block_patches_are_reported_not_counted_as_run(comfy):
    schedule = "3@0.0-1.0"
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=1.0, steps=2, seed=5,
                           patch_model=lambda g, m: g.add("PARETestBypassBlockPatches", model=out(g.add(
                               "PAREStaticSchedule", model=out(m), schedule=schedule))))
    report = g.add("PARERoutingReport", model=out(g.find("PAREStaticSchedule")), samples=out(g.find("KSampler")))
    text = g.add("PreviewAny", source=out(report, 1))
    before = comfy.log_text()
    summary = comfy.run(g.to_json())["outputs"][text]["text"][0]
    assert "2 model call(s) ran without PARE's block patches" in summary, summary
    assert "block calls executed" not in summary, summary
    new_log = comfy.log_text()[len(before):]
    warnings = [ln for ln in new_log.splitlines() if f"'{schedule}'" in ln and "without PARE's block patches" in ln]
    assert len(warnings) == 1, new_log[-3000:]
