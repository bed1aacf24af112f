"""The toy world's `pare` stage end to end at a tiny size (training/toyworld/pare_stages.py): calibrate, prune both
ways, distill both, route, the hard-gate phase, export; the shipped teacher, text encoder and VAE as inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comfyui_pare.router import read_router_spec
from comfyui_pare.wan_reader import read_meta
from training.toyworld.latents import cache_latents
from training.toyworld.pare_stages import PareSettings, run_pipeline
from training.toyworld.teacher import SHIFT

WEIGHTS = Path(__file__).resolve().parents[2] / "training" / "toyworld" / "weights"


@pytest.mark.slow
def test_pare_stage_runs_the_hard_gate_phase_and_exports_its_decisions(tmp_path):
    for name in ("pare_toy_teacher", "pare_toy_text", "pare_toy_vae"):
        shutil.copyfile(WEIGHTS / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    s = PareSettings(samples=12, uncond_samples=4, distill_steps=6, route_steps=6, hard_gate_steps=6, batch=4,
                     on_collapse="warn")  # six steps from initialisation: the plumbing, not a learned router
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cache_latents(s.samples + s.uncond_samples, tmp_path / "latents.safetensors")
        files = run_pipeline(tmp_path, "cpu", SHIFT, s)
    finally:
        torch.set_num_threads(n)
    stage2 = json.loads((tmp_path / "pare" / "route" / "route_report.json").read_text())
    hard = json.loads((tmp_path / "pare" / "route_hard_gates" / "route_report.json").read_text())
    # The hard-gate phase keeps stage 2's decisions (its threshold folded into the bias) on the same held-out inputs.
    assert hard["default_threshold"] == 0.5
    assert hard["executed_fraction"] == pytest.approx(stage2["executed_fraction"], abs=1e-6)
    spec = read_router_spec(files["router"])
    assert spec.train_budget == s.budget and spec.default_threshold == 0.5
    assert spec.model_fingerprint == read_meta(files["student"])[0].fingerprint()
