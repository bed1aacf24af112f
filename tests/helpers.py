"""Small builders shared by the tests: teachers with stock-loadable dims, plans, conditioning files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.router import RouterSpec
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import WanDims
from training.tiny import TINY_T2V, random_wan_state_dict

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


def write_conditioning_pair(folder: Path, pos: str, neg: str, text_dim: int, seeds: tuple[int, int] = (1, 2)) -> None:
    """The positive and negative conditioning files a test workflow loads from ComfyUI's ``input`` folder."""
    write_conditioning(folder / pos, text_dim, seed=seeds[0])
    write_conditioning(folder / neg, text_dim, seed=seeds[1])


def write_plan(path: Path, blocks: list[dict]) -> Path:
    path.write_text(json.dumps({"blocks": blocks}))
    return path


# Original Wan2.1 module names -> diffusers' WanTransformer3DModel names (docs/comfyui_notes.md), written out by
# hand rather than taken from comfyui_pare.lora, so the parser and the model are checked against an independent table.
DIFFUSERS_BLOCK_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.norm_k_img": "attn2.norm_added_k", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "norm3": "norm2", "modulation": "scale_shift_table",
}
DIFFUSERS_GLOBAL_NAMES = {
    "patch_embedding": "patch_embedding", "head.head": "proj_out", "head.modulation": "scale_shift_table",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}


def diffusers_module(module: str) -> str:
    """'blocks.3.self_attn.q' -> 'blocks.3.attn1.to_q'; 'head.head' -> 'proj_out'."""
    if module.startswith("blocks."):
        _, i, local = module.split(".", 2)
        return f"blocks.{i}.{DIFFUSERS_BLOCK_NAMES[local]}"
    return DIFFUSERS_GLOBAL_NAMES[module]


def shifted_sigma(shift: float, t: float) -> float:
    """Wan's shifted flow sigma at time t in [0, 1] (ComfyUI's time_snr_shift), written out independently."""
    return shift * t / (1 + (shift - 1) * t)


def step_sigmas(steps: int, shift: float) -> list[float]:
    """Sigmas of ComfyUI's 'simple' schedule for Wan's shifted flow (the step start sigmas)."""
    table = [shifted_sigma(shift, (i + 1) / 1000.0) for i in range(1000)]
    return [table[-(1 + int(x * len(table) / steps))] for x in range(steps)]


def zeroed_teacher(teacher: dict, plans: list[dict], head_dim: int, num_heads: int, ffn_dim: int) -> dict:
    """The teacher with pruned units zeroed: an exact functional twin of the pruned student."""
    sd = {k: v.clone() for k, v in teacher.items()}
    for i, plan in enumerate(plans):
        p = f"blocks.{i}."
        ffn = plan.get("ffn", list(range(ffn_dim)))
        drop = [j for j in range(ffn_dim) if j not in ffn]
        sd[p + "ffn.0.weight"][drop] = 0
        sd[p + "ffn.0.bias"][drop] = 0
        sd[p + "ffn.2.weight"][:, drop] = 0
        heads = plan.get("heads", list(range(num_heads)))
        rows = [h * head_dim + c for h in range(num_heads) if h not in heads for c in range(head_dim)]
        for n in ("q", "k", "v"):
            sd[p + f"self_attn.{n}.weight"][rows] = 0
            sd[p + f"self_attn.{n}.bias"][rows] = 0
        sd[p + "self_attn.o.weight"][:, rows] = 0
        # RMSNorm over the whole dim sees zeros for pruned heads; this factor makes it the kept-dim RMS.
        scale = math.sqrt(len(heads) / num_heads)
        for n in ("norm_q", "norm_k"):
            sd[p + f"self_attn.{n}.weight"] *= scale
    return sd


# The user-facing node list, kept in one place (the node-listing test and the packaging test).
PACK_NODES = ("PARELoadPrunedWan", "PARELoraLoader", "PARELoadRouter", "PAREApplyRouter",
              "PAREStaticSchedule", "PARERoutingReport", "PARETokenReduction", "PAREToyTextEncode",
              "PARESaveCalibrationSample")


# The tiny T2V's routers in the routing tests: one block-skip decision per block (N), a RouterSpec for it.
N = TINY_T2V.num_layers
SPEC = RouterSpec(num_blocks=N, dim=TINY_T2V.dim)
# Timestep switch at t=600: early (noisy) steps skip blocks 1 and 3, late steps skip blocks 2 and 4.
EARLY = [5.0, -5.0, 5.0, -5.0, 5.0, 5.0]
LATE = [5.0, 5.0, -5.0, 5.0, -5.0, 5.0]
BOUNDARY = 600.0
