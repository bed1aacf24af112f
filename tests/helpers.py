"""Small builders shared by the tests: teachers with stock-loadable dims, plans, conditioning files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.tiny import random_wan_state_dict
from comfyui_pare.wan import WanDims

# Head dim 128 and text dim 4096: what ComfyUI's stock detection assumes, so UNETLoader can load these.
STOCK_T2V = WanDims(dim=512, num_heads=4, ffn_dim=384, num_layers=3, text_dim=4096)
STOCK_I2V = WanDims(dim=256, num_heads=2, ffn_dim=256, num_layers=2, text_dim=4096, in_dim=36, variant="i2v")
COND_TOKENS = 8


def write_teacher(path: Path, dims: WanDims, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = random_wan_state_dict(dims, seed=seed)
    save_checkpoint(path, sd, PrunedWanMeta.teacher(dims))
    return sd


def write_conditioning(path: Path, text_dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    save_atomic(path, {"context": torch.randn(COND_TOKENS, text_dim, generator=gen),
                       "clip_fea": torch.randn(257, 1280, generator=gen)}, {"format": "pt"})


def write_plan(path: Path, blocks: list[dict]) -> Path:
    path.write_text(json.dumps({"blocks": blocks}))
    return path
