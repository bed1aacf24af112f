"""Stage 2 (``python -m training route``) and ``export`` end to end on a tiny teacher whose blocks matter at
different noise levels: the budget, the static baseline, the files in the real ComfyUI, resume and torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_latent
from graphs import out, pare_loader, sample_graph
from route_pipeline import DIMS, EARLY, LATE, build_inputs, write_config
from safetensors.torch import load_file

from comfyui_pare.router import RoutingPolicy, load_router, read_router_spec
from comfyui_pare.safetensors_io import save_atomic
from training.__main__ import main as training_main

REPO = Path(__file__).resolve().parents[2]
BUDGET = 0.5
STEPS = 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, one_thread) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("route-inputs"))


@pytest.fixture(scope="module")
def stage2(inputs, tmp_path_factory, one_thread) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("route-run")
    cfg = write_config(root / "route.toml", inputs, root / "out", STEPS, budget=BUDGET, checkpointing_steps=STEPS)
    assert training_main(["route", "--config", str(cfg)]) == 0
    return root / "out", json.loads((root / "out" / "route_report.json").read_text())


def test_stage2_meets_its_budget_and_beats_the_static_schedule(stage2, capsys):
    _, report = stage2
    errors = report["velocity_error"]
    with capsys.disabled():
        print(f"\n[stage 2] budget {BUDGET}, held-out compute {report['executed_fraction']:.4f} "
              f"(threshold {report['default_threshold']:.4g}); velocity error vs teacher: router "
              f"{errors['router']:.4f}, static {errors['static_schedule']} at compute {errors['static_fraction']:.3f} "
              f"{errors['static_stage1']:.4f} (stage-1 student), {errors['static_stage2']:.4f} (stage-2 student); "
              f"all blocks: stage 1 {errors['stage1_all_blocks']:.4f}, stage 2 {errors['stage2_all_blocks']:.4f}")
    assert abs(report["executed_fraction"] - BUDGET) <= 0.05
    assert errors["static_fraction"] >= report["executed_fraction"] - 1e-6  # the static spends at least as much
    assert errors["router"] < errors["static_stage1"]
    spec = read_router_spec(report["router"])
    assert spec.train_budget == BUDGET and spec.default_threshold == pytest.approx(report["default_threshold"])


def test_the_router_learned_when_blocks_matter(stage2, inputs):
    """The teacher's blocks 1-2 matter at high noise, 3-4 at low noise: the trained router's decisions follow."""
    from comfyui_pare.calibration import read_folder
    from training.model import WanTransformer
    from training.routed import RoutedVelocity
    from training.sampling import process_in

    _, report = stage2
    student, router = WanTransformer.from_checkpoint(report["student"]), load_router(report["router"])
    velocity = RoutedVelocity(student, router, RoutingPolicy(threshold=router.spec.default_threshold,
                                                             pin_first=1, pin_last=1))
    samples = read_folder(inputs["samples"])
    x0 = process_in(torch.stack([s.latent for s in samples]))
    ctx = torch.stack([s.context for s in samples])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    for sigma, runs, idle in ((0.95, EARLY, LATE), (0.9, EARLY, LATE), (0.3, LATE, EARLY), (0.1, LATE, EARLY)):
        x = (1 - sigma) * x0 + sigma * noise
        mask = velocity.decisions(x, torch.full((len(samples),), sigma * 1000), ctx)
        assert mask[:, list(runs)].any(dim=1).all() and not mask[:, list(idle)].any(), (sigma, mask.int().tolist())


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _conditioning(folder: Path, name: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(8, DIMS.text_dim, generator=gen)
    save_atomic(folder / name, {"context": ctx}, {"format": "pt"})
    return ctx


@pytest.mark.comfy
def test_exported_student_and_router_reproduce_training_side_sampling_in_comfyui(stage2, comfy):
    from training.model import WanTransformer
    from training.routed import RoutedVelocity
    from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler

    run_dir, report = stage2
    student_file = comfy.base / "models" / "diffusion_models" / "pare_route_student.safetensors"
    router_file = comfy.base / "models" / "pare_routers" / "pare_route_router.safetensors"
    router_file.parent.mkdir(parents=True, exist_ok=True)
    assert training_main(["export", "--run", str(run_dir), "--student-out", str(student_file),
                          "--router-out", str(router_file)]) == 0
    # The export verb and the end of `route` write the same files.
    for mine, theirs in ((student_file, report["student"]), (router_file, report["router"])):
        a, b = _tensors(mine), _tensors(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_router_spec(router_file) == read_router_spec(report["router"])

    pos = _conditioning(comfy.base / "input", "pare_route_pos.safetensors", 1)
    neg = _conditioning(comfy.base / "input", "pare_route_neg.safetensors", 2)
    steps, shift, cfg, seed = 6, 3.0, 3.0, 11

    def routed(g, model):
        r = g.add("PARELoadRouter", router_name=router_file.name)
        return g.add("PAREApplyRouter", model=out(model), router=out(r), mode="trained", budget=0.75,
                     threshold=0.5, pin_first=1, pin_last=1)

    g, save = sample_graph(pare_loader(student_file.name), cfg=cfg, steps=steps, shift=shift, seed=seed,
                           frames=9, size=64, positive="pare_route_pos.safetensors",
                           negative="pare_route_neg.safetensors", patch_model=routed)
    rep = g.add("PARERoutingReport", model=out(g.find("PAREApplyRouter")), samples=out(g.find("KSampler")))
    txt = g.add("PreviewAny", source=out(rep, 1))
    entry = comfy.run(g.to_json())
    ours = read_latent(comfy.output_files(entry, save, "latents")[0])

    # Training side: the same files, the router's trained threshold and the node's default pins.
    student = WanTransformer.from_checkpoint(student_file)
    router = load_router(router_file)
    velocity = RoutedVelocity(student, router, RoutingPolicy(threshold=router.spec.default_threshold,
                                                             pin_first=1, pin_last=1))
    noise = initial_noise(ours.shape, seed)
    sigmas = flow_sigmas(steps, shift)
    ref = ksampler_euler(velocity, noise, sigmas, Conditioning(pos[None]), Conditioning(neg[None]), cfg=cfg)
    masks = torch.stack(velocity.masks)  # [steps, 2 (uncond, cond), blocks]
    assert not masks.all(), "the router must skip blocks for this comparison to mean anything"
    full = ksampler_euler(lambda x, t, c, f=None: student(x, t, c), noise, sigmas, Conditioning(pos[None]),
                          Conditioning(neg[None]), cfg=cfg)
    assert (ref - full).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    summary = entry["outputs"][txt]["text"][0]
    assert f"block calls executed: {int(masks.sum())} of {masks.numel()}" in summary, summary


# ------------------------------------------------------------------------------ resume after kill, torchrun

SHORT = 6


def _launch(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, what: str) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def short_runs(inputs, tmp_path_factory, one_thread) -> dict[str, Path]:
    """The same short config three ways: uninterrupted, killed with SIGKILL and resumed, torchrun x2."""
    root = tmp_path_factory.mktemp("route-short")
    dirs = {name: root / name for name in ("whole", "killed", "ddp")}
    cfgs = {name: write_config(root / f"{name}.toml", inputs, d, SHORT, budget=BUDGET, checkpointing_steps=2)
            for name, d in dirs.items()}
    verb = ["-m", "training", "route", "--config"]
    killed = _launch(verb + [str(cfgs["killed"])])
    deadline = time.time() + 240
    while not (dirs["killed"] / "checkpoint-2").is_dir():
        assert killed.poll() is None, "the run to kill ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint-2 after 240 s"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (dirs["killed"] / "student.safetensors").exists(), "the run finished before it was killed"
    resumed = _launch(verb + [str(cfgs["killed"]), "--resume", "latest"])
    assert training_main(["route", "--config", str(cfgs["whole"])]) == 0  # in this process, also one thread
    _finish(resumed, "resumed run")
    ddp = _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *verb,
                   str(cfgs["ddp"])])
    _finish(ddp, "torchrun --nproc_per_node 2")
    return dirs


def test_route_resumed_after_kill_equals_uninterrupted_run(short_runs):
    for name in ("student.safetensors", "router.safetensors"):
        a, b = _tensors(short_runs["whole"] / name), _tensors(short_runs["killed"] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_router_spec(short_runs["whole"] / "router.safetensors") == read_router_spec(
        short_runs["killed"] / "router.safetensors")


def test_route_under_torchrun_two_processes_equals_one_process(short_runs):
    # Gradients differ by float rounding only (a mean of two half-batch means); Adam amplifies that where a
    # router weight's gradient is tiny, hence the router's looser absolute tolerance.
    for name, atol in (("student.safetensors", 1e-5), ("router.safetensors", 2e-4)):
        a, b = _tensors(short_runs["whole"] / name), _tensors(short_runs["ddp"] / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol, msg=f"{name}: {k}")
    one = json.loads((short_runs["whole"] / "route_report.json").read_text())
    two = json.loads((short_runs["ddp"] / "route_report.json").read_text())
    assert two["executed_fraction"] == pytest.approx(one["executed_fraction"], abs=1e-6)


def test_hard_gate_phase_trains_the_student_under_the_frozen_routers_decisions(stage2, inputs, tmp_path):
    """`route.frozen_router` (the hard-gate phase): the student keeps training, the router does not, and the exported
    router at its stored threshold makes exactly the decisions the input router made at its own threshold."""
    first, report = stage2
    cfg = write_config(tmp_path / "polish.toml", {**inputs, "student": first / "student.safetensors"}, tmp_path / "out",
                       8, budget=BUDGET, checkpointing_steps=8, extra=f'frozen_router = "{first / "router.safetensors"}"')
    assert training_main(["route", "--config", str(cfg)]) == 0
    before, after = load_router(first / "router.safetensors"), load_router(tmp_path / "out" / "router.safetensors")
    assert before.spec.default_threshold == pytest.approx(report["default_threshold"])
    assert before.spec.default_threshold != 0.5  # the shift below is exercised
    assert after.spec.default_threshold == 0.5
    for name in ("fc1.weight", "fc1.bias", "fc2.weight"):
        assert torch.equal(before.state_dict()[name], after.state_dict()[name]), name
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(64, 10, DIMS.dim, generator=g)
    t = torch.rand(64, generator=g) * 1000
    with torch.no_grad():
        old = torch.sigmoid(before(t, tokens)) > before.spec.default_threshold
        new = torch.sigmoid(after(t, tokens)) > after.spec.default_threshold
    assert torch.equal(old, new) and 0 < int(old.sum()) < old.numel()
    s0, s1 = load_file(first / "student.safetensors"), load_file(tmp_path / "out" / "student.safetensors")
    assert s0.keys() == s1.keys() and any(not torch.equal(s0[k], s1[k]) for k in s0)


def test_frozen_router_errors_name_the_field_and_file(stage2, inputs, tmp_path):
    from training.config import ConfigError, load_config
    from training.route import RouteConfig, build

    first, _ = stage2
    both = write_config(tmp_path / "both.toml", inputs, tmp_path / "o1", 2,
                        extra=f'frozen_router = "{first / "router.safetensors"}"\nfixed_schedule = "1-2"')
    with pytest.raises(ConfigError, match="'route.fixed_schedule' and 'route.frozen_router' exclude each other"):
        load_config(RouteConfig, both, [])
    # A frozen router keeps its own architecture (any hidden width or router format), but must fit the student.
    from comfyui_pare.router import BlockRouter, RouterSpec, load_router, save_router

    spec = load_router(first / "router.safetensors").spec
    other = tmp_path / "other_blocks.safetensors"
    save_router(other, BlockRouter(RouterSpec(num_blocks=spec.num_blocks - 1, dim=spec.dim, hidden=spec.hidden)))
    wrong = write_config(tmp_path / "wrong.toml", inputs, tmp_path / "o2", 2, extra=f'frozen_router = "{other}"')
    with pytest.raises(ConfigError, match=r"route.frozen_router': .*other_blocks.safetensors is a router for "
                                          rf"{spec.num_blocks - 1} blocks .* this student has {spec.num_blocks}"):
        build(load_config(RouteConfig, wrong, []))


def test_export_records_the_budgets_it_was_validated_for(stage2):
    """The router file carries its budget family (pare_router_budget): calibrated on one set of held-out inputs,
    validated on another by spend and by velocity error against the static skip of the same compute."""
    from comfyui_pare.router_budget import read_budget_calibration

    _, report = stage2
    cal = read_budget_calibration(report["router"])
    part = report["budget_calibration"]
    assert cal is not None and list(cal.budgets) == part["budgets"] and list(cal.thresholds) == part["thresholds"]
    assert all(a >= b for a, b in zip(cal.thresholds, cal.thresholds[1:]))  # more budget never skips more
    for b, s in zip(cal.budgets, cal.spent):
        if b >= 2 / 6:  # the two pinned blocks of six cost a third: lower budgets cannot be met
            assert abs(s - b) <= 0.03, (b, s)
    rows = {r["budget"]: r for r in part["quality"]}
    for b in cal.validated_budgets:  # validated: the held-out half spends it, and the router is no worse than static
        assert abs(cal.held_out_spent[cal.budgets.index(b)] - b) <= 0.03 and rows[b]["ok"]
    assert cal.is_validated(BUDGET), cal.describe_validated()  # the budget it was trained for
    assert cal.pin_first == 1 and cal.pin_last == 1
    assert cal.model_fingerprint == load_router(report["router"]).spec.model_fingerprint


def test_calibrate_router_verb_calibrates_an_existing_router_file(stage2, inputs, tmp_path):
    """`python -m training calibrate-router` on the exported files: a monotone family that spends each budget on its
    calibration half, validated by spend and velocity error on the other half, written to a copy (tensors kept)."""
    from comfyui_pare.router_budget import read_budget_calibration

    _, report = stage2
    dest = tmp_path / "calibrated.safetensors"
    assert training_main(["calibrate-router", "--student", report["student"], "--router", report["router"],
                          "--samples", str(inputs["samples"]), "--out", str(dest), "--steps", "10", "--shift", "1.0",
                          "--budgets", "0.4:1.0:0.1", "--teacher", str(inputs["teacher"]),
                          "--stats", str(inputs["stats"]), "--max-error-ratio", "1e6"]) == 0
    cal = read_budget_calibration(dest)
    assert cal.budgets == (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0) and cal.inputs > 0
    assert all(a >= b for a, b in zip(cal.thresholds, cal.thresholds[1:]))
    assert all(abs(s - b) <= 0.03 for b, s in zip(cal.budgets, cal.spent)), cal.spent
    assert set(cal.validated_budgets) <= {b for b, h in zip(cal.budgets, cal.held_out_spent) if abs(h - b) <= 0.03}
    assert "velocity error no worse" in cal.note and "at most 1e+06x the trained threshold's" in cal.note
    original, copy = load_file(report["router"]), load_file(str(dest))
    assert all(torch.equal(original[k], copy[k]) for k in original)
    assert read_budget_calibration(report["router"]).note != cal.note  # the source file was left alone
    assert training_main(["calibrate-router", "--student", report["student"], "--router", report["router"],
                          "--samples", str(inputs["samples"]), "--budgets", "0.7,0.5"]) == 2  # a clear error


def test_calibrate_writes_static_schedule_suggestions_the_node_parses(inputs):
    """`calibrate` (run by the inputs fixture) wrote its training-free schedules beside the stats."""
    from comfyui_pare.schedule import parse_schedule

    body = json.loads((inputs["stats"].parent / "stats_schedules.json").read_text())
    assert [s["budget"] for s in body["schedules"]] == [0.5, 0.6, 0.7, 0.8]
    for s in body["schedules"]:
        ranges = parse_schedule(s["schedule"], 6)  # the tiny teacher's 6 blocks; raises if malformed
        assert s["nominal_compute"] <= s["budget"] + 1e-9
        assert all(r.first_block >= 1 and r.last_block <= 4 for r in ranges)  # first and last block kept


def test_a_route_run_that_ends_with_a_constant_router_stops_before_export(inputs, tmp_path, capsys, one_thread):
    """Two steps from initialisation at the default router settings (format 2: LayerNorm'd features, rate 1e-3) leave
    its output constant over the held-out inputs: the stage fails naming the collapse and exports nothing;
    ``route.on_collapse = "warn"`` exports it with a warning (smoke runs of the plumbing)."""
    def config(name: str, extra: str = "") -> Path:
        path = write_config(tmp_path / f"{name}.toml", inputs, tmp_path / name, 2, budget=BUDGET, extra=extra)
        text = path.read_text().replace("router_learning_rate = 0.03", "router_learning_rate = 1e-3")
        path.write_text(text.replace("layer_norm = false", "layer_norm = true"))
        return path

    assert training_main(["route", "--config", str(config("strict"))]) != 0
    err = capsys.readouterr().err
    assert "stage 2 ended with a collapsed router" in err and "COLLAPSED (constant output)" in err, err[-2000:]
    assert not (tmp_path / "strict" / "router.safetensors").exists()
    assert training_main(["route", "--config", str(config("warn", 'on_collapse = "warn"'))]) == 0
    assert (tmp_path / "warn" / "router.safetensors").exists()
    assert training_main(["route", "--config", str(config("bad", 'on_collapse = "x"'))]) != 0
    assert "route.on_collapse" in capsys.readouterr().err
