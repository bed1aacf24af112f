"""The toy trainers resume: a run stopped at a saved step continues from exactly that state (model, text encoder
and Adam moments), and the rebuild skips stages whose stamp exists."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from comfyui_pare.safetensors_io import load_tensors
from training.toyworld import rebuild
from training.toyworld import teacher as teacher_module
from training.toyworld.cli import add_arguments, run
from training.toyworld.comfy_vae import load_vae
from training.toyworld.latents import cache_latents
from training.toyworld.teacher import TeacherConfig, train_teacher


def test_teacher_resumes_from_its_saved_state(tmp_path, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache_latents(8, tmp_path / "latents.safetensors")
        cfg = TeacherConfig(steps=2, batch=2, save_every=2, warmup=1)
        train_teacher(cfg, tmp_path / "latents.safetensors", tmp_path / "run")
        saved, meta = load_tensors(tmp_path / "run" / "teacher_state.safetensors")
        assert meta["step"] == "2" and any(k.startswith("opt.") for k in saved)

        loaded = {}
        real_load = teacher_module.load_state

        def spy(path, modules, optimizer):
            step, extra = real_load(path, modules, optimizer)
            loaded["step"] = step
            loaded["model"] = {k: v.clone() for k, v in modules["model"].state_dict().items()}
            loaded["exp_avg"] = [s["exp_avg"].clone() for s in optimizer.state.values()]
            return step, extra

        monkeypatch.setattr("training.toyworld.teacher.load_state", spy)
        model, _ = train_teacher(TeacherConfig(steps=3, batch=2, save_every=2, warmup=1),
                                 tmp_path / "latents.safetensors", tmp_path / "run")
        assert loaded["step"] == 2
        for k, v in loaded["model"].items():
            torch.testing.assert_close(v, saved[f"model.{k}"], rtol=0, atol=0)
        assert sum(bool(t.abs().sum() > 0) for t in loaded["exp_avg"]) > 10  # Adam's moments came back
        assert load_tensors(tmp_path / "run" / "teacher_state.safetensors")[1]["step"] == "3"
    finally:
        torch.set_num_threads(n)


def test_rebuild_skips_stamped_stages(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rebuild, "STAGES", {"a": lambda cfg: calls.append("a") or {"x": 1},
                                            "b": lambda cfg: calls.append("b") or {}})
    (tmp_path / "stamps").mkdir()
    (tmp_path / "stamps" / "a.json").write_text(json.dumps({"x": 1, "seconds": 5}))
    n = torch.get_num_threads()
    try:
        out = rebuild.rebuild(rebuild.RebuildConfig(out=tmp_path))
    finally:
        torch.set_num_threads(n)  # rebuild sets the process's thread count
    assert calls == ["b"] and out["a"]["seconds"] == 5 and (tmp_path / "stamps" / "b.json").exists()


def test_teacher_logs_its_motion_probe_and_the_rebuild_passes_teacher_settings(tmp_path, monkeypatch):
    """The probe (held-out colour/direction rates through the judge) is the learning curve the README quotes; the
    rebuild's --teacher-steps/--teacher-batch reach the trainer (what a GPU run raises)."""
    weights = Path(__file__).resolve().parents[2] / "training" / "toyworld" / "weights"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache_latents(4, tmp_path / "latents.safetensors")
        vae = load_vae(load_tensors(weights / "pare_toy_vae.safetensors")[0])
        cfg = TeacherConfig(steps=2, batch=2, save_every=2, warmup=1, probe_every=2)
        train_teacher(cfg, tmp_path / "latents.safetensors", tmp_path / "run", probe_vae=vae)
    finally:
        torch.set_num_threads(n)
    rows = [json.loads(line) for line in (tmp_path / "run" / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and rows[0]["n"] == 12
    assert 0 <= rows[0]["direction_rate"] <= 1 and 0 <= rows[0]["colour_rate"] <= 1

    class Stop(Exception):
        pass

    def capture(c, *args, **kwargs):
        seen["cfg"] = c
        raise Stop

    seen = {}
    monkeypatch.setattr(teacher_module, "train_teacher", capture)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["rebuild", "--out", str(tmp_path / "rb"), "--stages", "teacher",
                              "--teacher-steps", "7", "--teacher-batch", "3",
                              "--teacher-object-weight", "4"])
    try:
        with pytest.raises(Stop):
            run(args)
    finally:
        torch.set_num_threads(n)
    assert (seen["cfg"].steps, seen["cfg"].batch, seen["cfg"].object_weight) == (7, 3, 4.0)
    with pytest.raises(ValueError, match="--teacher-object-weight must be >= 0, got -1.0"):
        run(parser.parse_args(["rebuild", "--out", str(tmp_path / "rb"), "--teacher-object-weight", "-1"]))
    with pytest.raises(ValueError, match="--teacher-steps must be a positive integer, got 0"):
        run(parser.parse_args(["rebuild", "--out", str(tmp_path / "rb"), "--teacher-steps", "0"]))


def test_object_weights_cover_where_an_object_is_was_or_will_be():
    """The object-weighted loss upweights a cell in the frame an object occupies and in the frames either side of
    it, nowhere else; the empty scene (0 in every designed feature) keeps weight 1."""
    x0 = torch.zeros(2, 16, 5, 8, 8)
    x0[0, 13, 2, 3, 4] = 0.5  # one coverage feature of one cell, latent frame 2 of the first clip
    w = teacher_module.object_weights(x0, 9.0)
    assert w.shape == (2, 1, 5, 8, 8)
    expected = torch.ones_like(w)
    expected[0, 0, 1:4, 3, 4] = 10.0
    assert torch.equal(w, expected)
