"""The toy trainers resume: a run stopped at a saved step continues from exactly that state (model, text encoder
and Adam moments), and the rebuild skips stages whose stamp exists."""

from __future__ import annotations

import json

import torch

from comfyui_pare.safetensors_io import load_tensors
from training.toyworld import rebuild
from training.toyworld import teacher as teacher_module
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
