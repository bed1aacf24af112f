"""Router health (issue 28): a constant router is reported collapsed, the shipped toy router is alive and decides
differently for one- and two-object held-out prompts at the same step; the format-2 router (timestep prior,
LayerNorm, Fourier timestep code, no latent input) round-trips and format-1 files still load unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comfyui_pare.__main__ import main as cli
from comfyui_pare.calibration import write_sample
from comfyui_pare.router import BlockRouter, RouterSpec, RoutingPolicy, decide, load_router, save_router
from comfyui_pare.router_budget import read_budget_calibration
from comfyui_pare.router_health import health_from_logits, router_health
from comfyui_pare.router_inspect import flow_timesteps
from comfyui_pare.safetensors_io import read_header
from comfyui_pare.toy_text import ToyTextEncoder

WEIGHTS = Path(__file__).resolve().parents[2] / "training" / "toyworld" / "weights"
SHIPPED = WEIGHTS / "pare_toy_router.safetensors"
# Held-out colour/shape pairs (training/toyworld/videos.py HELD_OUT), one and two objects: no test samples these.
ONE_OBJECT = ("a green circle moving right", "a red triangle moving up", "a blue square moving down")
TWO_OBJECTS = ("a red triangle moving up and a blue square moving left",
               "a green circle moving down and a blue square moving right")
TOY_TIMESTEPS = 1000.0 * torch.tensor([1.0, 0.9, 0.75, 0.6, 0.45, 0.3, 0.15, 0.05])  # spread over the schedule


def dead_router() -> BlockRouter:
    """Like the toy router shipped before issue 28: every hidden unit's pre-activation far below SiLU's curve on
    every input, so the logits are the output bias (its values) whatever the step or prompt."""
    spec = RouterSpec(num_blocks=8, dim=128, freq_dim=256, hidden=128, train_budget=0.82)
    router = BlockRouter(spec, init_bias=[11.52, 0.99, 0.0, -0.38, 0.12, 0.46, 0.24, 1.29])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.fc1.weight.copy_(0.01 * torch.randn(router.fc1.weight.shape, generator=gen))
        router.fc1.bias.fill_(-33.6)
        router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=gen))
    return router.eval()


@pytest.fixture(scope="module")
def text() -> ToyTextEncoder:
    return ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")


def health_on_prompts(router: BlockRouter, text: ToyTextEncoder, prompts) -> object:
    with torch.no_grad():
        ctx = torch.stack([text([p])[0] for p in prompts])
    tokens = torch.randn(len(prompts), len(TOY_TIMESTEPS), 80, router.spec.dim, generator=torch.Generator().manual_seed(1))
    return router_health(router, TOY_TIMESTEPS, tokens, ctx if router.spec.text_dim else None,
                         torch.tensor([True, False, False, False, False, False, False, True]))


def test_a_constant_router_is_reported_collapsed(text):
    for router in (dead_router(), BlockRouter.constant(RouterSpec(num_blocks=8, dim=128, text_dim=64, hidden=16),
                                                       torch.linspace(-2, 2, 8))):
        health = health_on_prompts(router, text, ONE_OBJECT + TWO_OBJECTS)
        assert health.collapsed and not health.timestep_sensitive and not health.content_sensitive, health
        assert health.decision_spread_inputs == 0.0 and health.decision_spread_steps == 0.0
    assert health_on_prompts(dead_router(), text, ONE_OBJECT).live_units == 0.0


def test_health_sees_timestep_and_content_dependence_separately():
    steps_only = torch.arange(4.0)[None, :, None].expand(3, 4, 5).clone()  # logits move with the step only
    h = health_from_logits(steps_only)
    assert h.timestep_sensitive and not h.content_sensitive and not h.collapsed
    inputs_only = torch.arange(3.0)[:, None, None].expand(3, 4, 5).clone()
    h = health_from_logits(inputs_only)
    assert h.content_sensitive and not h.timestep_sensitive
    pre = torch.cat([torch.full((12, 3), -30.0), torch.linspace(-1, 1, 12)[:, None].expand(12, 2)], dim=1)
    assert health_from_logits(inputs_only, pre).live_units == pytest.approx(2 / 5)


def test_the_shipped_router_is_alive_and_adapts_to_timestep_and_content(text):
    router = load_router(SHIPPED)
    health = health_on_prompts(router, text, ONE_OBJECT + TWO_OBJECTS)
    assert not health.collapsed and health.timestep_sensitive and health.content_sensitive, health
    assert health.live_units >= 0.5 and health.decision_spread_inputs > 0.0, health


def test_the_shipped_router_decides_differently_for_one_and_two_object_prompts_at_one_step(text):
    """Budget mode 0.5 (the calibrated threshold the node uses), the toy sampler's steps (20, shift 3): at some step
    the decisions for a held-out one-object prompt and a held-out two-object prompt differ in at least one block. The
    router reads only the step and the text, so no sampling is needed to know its decisions."""
    router = load_router(SHIPPED)
    cal = read_budget_calibration(SHIPPED)
    assert cal is not None and not router.spec.token_input
    policy = RoutingPolicy(threshold=cal.threshold_for(0.5), pin_first=1, pin_last=1)
    steps = flow_timesteps(20, 3.0)
    tokens = torch.zeros(len(steps), 1, router.spec.dim)
    with torch.no_grad():
        runs = {p: decide(router(steps, tokens, text([p]).expand(len(steps), -1, -1)), policy)
                for p in ONE_OBJECT + TWO_OBJECTS}
    differ = [(one, two, int(step)) for one in ONE_OBJECT for two in TWO_OBJECTS
              for step in torch.nonzero((runs[one] != runs[two]).any(dim=1)).flatten()]
    assert differ, "the shipped router makes the same decisions for one- and two-object prompts at every step"


def test_inspect_reports_the_dead_router_collapsed_and_the_shipped_one_alive(tmp_path, text, capsys):
    samples = tmp_path / "samples"
    samples.mkdir()
    with torch.no_grad():
        for i, prompt in enumerate(ONE_OBJECT + TWO_OBJECTS):
            write_sample(samples / f"s{i}.safetensors", text([prompt])[0], latent_shape=(16, 5, 8, 8), seed=i,
                         prompt=prompt, latent=torch.randn(16, 5, 8, 8, generator=torch.Generator().manual_seed(i)))
    dead = tmp_path / "dead.safetensors"
    save_router(dead, dead_router())
    for path, collapsed in ((dead, True), (SHIPPED, False)):
        capsys.readouterr()
        assert cli(["inspect", str(path), "--samples", str(samples), "--steps", "8", "--shift", "3",
                    "--student", str(WEIGHTS / "pare_toy_student.safetensors")]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["health"]["collapsed"] is collapsed, report["health"]
        if not collapsed:
            assert report["health"]["timestep_sensitive"] and report["health"]["content_sensitive"]


def test_format_two_round_trips_and_format_one_files_stay_format_one(tmp_path):
    spec = RouterSpec(num_blocks=8, dim=32, freq_dim=8, text_dim=16, hidden=8, prior_knots=5, layer_norm=True,
                      token_input=False, time_code="fourier")
    router = BlockRouter(spec, init_bias=0.0)
    router.set_prior([1000.0, 50.0, 800.0, 300.0, 550.0], torch.arange(40.0).reshape(5, 8))
    with torch.no_grad():
        router.fc2.weight.normal_()
    path = tmp_path / "r2.safetensors"
    save_router(path, router)
    loaded = load_router(path)
    t, tok, txt = torch.tensor([1000.0, 675.0, 10.0]), torch.randn(3, 7, 32), torch.randn(3, 4, 16)
    assert torch.equal(router(t, tok, txt), loaded(t, tok, txt))
    assert json.loads(read_header(str(path))[1]["pare_router"])["format_version"] == 2
    # The prior interpolates between knots (stored ascending) and clamps outside them.
    assert torch.allclose(loaded.prior(torch.tensor([50.0, 175.0, 2000.0]), 3),
                          torch.stack([torch.arange(8.0) + 8, torch.arange(8.0) + 16, torch.arange(8.0)]))
    v1 = tmp_path / "r1.safetensors"
    save_router(v1, dead_router())
    meta = json.loads(read_header(str(v1))[1]["pare_router"])
    assert meta["format_version"] == 1 and "prior_knots" not in meta  # older packs read it
