"""Gather the toy world's deliverables under one folder, with the names `make demo` installs."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from comfyui_pare.pruned import save_checkpoint
from comfyui_pare.wan_reader import load_checkpoint

FULL = ("pare_toy_teacher.safetensors", "pare_toy_student.safetensors", "pare_toy_vae.safetensors",
        "pare_toy_text.safetensors")
ROUTER = "pare_toy_router.safetensors"
HALF = {"pare_toy_student_aware_stage1.safetensors": "pare/distill_aware/student.safetensors",
        "pare_toy_student_magnitude_stage1.safetensors": "pare/distill_magnitude/student.safetensors"}


def ship(out: Path, dest: Path) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*FULL, ROUTER):
        shutil.copyfile(out / name, dest / name)
    for name, src in HALF.items():
        sd, meta = load_checkpoint(out / src)
        save_checkpoint(dest / name, {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()},
                        meta)
    sizes = {p.name: p.stat().st_size for p in dest.glob("*.safetensors")}
    return {"bytes": sum(sizes.values()), "files": sizes}
