"""Tiny teachers, calibration samples and configs shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_pare.calibration import write_sample
from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.wan import WanDims
from training.config import load_config
from training.distill import DistillConfig, train
from training.tiny import random_wan_state_dict

# Head dim 16 and text dim 64 (the tiny conditioning files' text dim), so a student also runs in ComfyUI's tests.
MICRO = WanDims(dim=64, num_heads=4, ffn_dim=128, num_layers=2, text_dim=64)
LATENT = [16, 3, 4, 4]


def write_micro_teacher(path: Path, dims: WanDims = MICRO, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = random_wan_state_dict(dims, seed=seed)
    save_checkpoint(path, sd, PrunedWanMeta.teacher(dims))
    return sd


def write_samples(folder: Path, count: int, text_dim: int = MICRO.text_dim, latent_shape: list[int] = LATENT,
                  seed: int = 0, tokens: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        write_sample(folder / f"s{i:02d}.safetensors", torch.randn(tokens + i % 3, text_dim, generator=gen),
                     latent_shape=latent_shape, seed=seed + i, prompt=f"prompt {i}",
                     latent=torch.randn(*latent_shape, generator=gen))
    return folder


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else repr(v)


def distill_toml(teacher: Path, student: Path, samples: Path, out: Path, tables: str = "", **train) -> str:
    """A stage-1 config; ``train`` overrides [train] fields, ``tables`` is appended (e.g. a [distill] table)."""
    settings = {"steps": 6, "batch_size": 2, "learning_rate": 1e-3, "checkpointing_steps": 2,
                "checkpoints_total_limit": 2, "device": "cpu", **train}
    body = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
    return (f'[model]\nteacher = "{teacher}"\nstudent = "{student}"\n[data]\nsamples = "{samples}"\n'
            f'[train]\noutput_dir = "{out}"\n{body}\n{tables}')


def run_distill_in_process(cfg_path: Path, resume: str | None = None) -> dict:
    """Stage 1 in this process on one thread (two spinning threads on a shared CPU are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(DistillConfig, cfg_path), resume)
    finally:
        torch.set_num_threads(threads)
