"""Small random Wan checkpoints with the real architecture, for tests, demos and benchmarks.

Weights are drawn with fan-in scaling so activations stay O(1) through every block; norms start at 1 and
the modulation tables are small, like a trained Wan. Deterministic for a given seed.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.safetensors_io import StreamingWriter
from comfyui_pare.wan import WanDims

# The project's tiny default: several heads per block (head dim 32) so head pruning has something to choose.
TINY_T2V = WanDims(dim=256, num_heads=8, ffn_dim=512, num_layers=6, text_dim=64, in_dim=16, out_dim=16)
TINY_I2V = WanDims(dim=256, num_heads=8, ffn_dim=512, num_layers=6, text_dim=64, in_dim=36, out_dim=16, variant="i2v")
# Wan2.2 TI2V-5B's layout (48-channel latents in and out; the real one: dim 3072, 24 heads, FFN 14336, 30 blocks).
TINY_TI2V_5B = WanDims(dim=256, num_heads=8, ffn_dim=512, num_layers=6, text_dim=64, in_dim=48, out_dim=48)
# Wan2.1 VACE's layout: hints after main blocks 0, 2, 4 (the real 1.3B: 30 blocks, 15 VACE blocks, vace_in_dim 96).
TINY_VACE = WanDims(dim=256, num_heads=8, ffn_dim=512, num_layers=6, text_dim=64, vace_layers=3, vace_in_dim=96)


def random_wan_state_dict(dims: WanDims, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full-width random Wan state dict in the original key layout."""
    gen = torch.Generator().manual_seed(seed)
    return {key: _random_tensor(key, shape, gen).to(dtype)
            for key, shape in PrunedWanMeta.teacher(dims).expected_shapes().items()}


def write_random_wan(path: str | os.PathLike, meta: PrunedWanMeta, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> int:
    """A random (pruned or full) Wan checkpoint of ``meta``, drawn as ``random_wan_state_dict`` draws and written one
    tensor at a time (models larger than memory, for the memory benchmarks). Returns the bytes of its tensors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = meta.expected_shapes()
    with StreamingWriter(path, {k: (dtype, s) for k, s in shapes.items()}, meta.to_header()) as writer:
        for key in writer.order:
            writer.write(key, _random_tensor(key, shapes[key], gen).to(dtype))
    return sum(math.prod(s) for s in shapes.values()) * dtype.itemsize


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if key.endswith("modulation"):
        return torch.randn(shape, generator=gen) * 0.1
    if ".norm" in key or key.startswith("img_emb.proj.0") or key.startswith("img_emb.proj.4"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)) if key.endswith("weight") else \
            0.05 * torch.randn(shape, generator=gen)
    if key.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.prod(shape[1:]) ** 0.5


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_to_fp8(sd: dict[str, torch.Tensor], scaled: Callable[[str, torch.Tensor], bool],
                 other_dtype: torch.dtype | None = None, marker_elements: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout (its ``*_fp8_scaled`` Wan releases): each weight ``scaled(key, tensor)`` picks as
    float8_e4m3fn with a 0-d fp32 ``scale_weight`` (max |w| / 448) and ``scale_input`` (1.0), the rest cast to
    ``other_dtype`` (None: as it is), and the ``scaled_fp8`` marker (empty: ComfyUI then enables its fp8 matrix
    multiplies; 2 elements: it does not)."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        if scaled(key, v):
            scale = (v.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
            out[key] = (v.float() / scale).to(torch.float8_e4m3fn)
            base = key.removesuffix(".weight")
            out[f"{base}.scale_weight"] = scale.reshape(())
            out[f"{base}.scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[key] = v if other_dtype is None else v.to(other_dtype)
    out["scaled_fp8"] = torch.zeros(marker_elements, dtype=torch.float8_e4m3fn)
    return out
