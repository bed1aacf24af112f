"""LoRA patches and their files in every key style, shared by the core LoRA tests and the node tests.

``random_lora`` patches every kind of module with dyadic low-rank factors (exact in fp32 whatever the summation
order: see tests/core/test_lora_core.py); ``write_style`` writes patches under one of ``STYLES``' key names.
``make_lora`` / ``write_lora`` are the node tests' smaller LoRAs and their files (``FILE_STYLES``, including the
dense ``.diff`` form).
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import diffusers_module

from comfyui_pare.lora import LoraPatch
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import WanDims

diffusers_name = diffusers_module


STYLES = {  # style -> (module name writer, down suffix, up suffix)
    "diffusion_model": (lambda m: f"diffusion_model.{m}", ".lora_down.weight", ".lora_up.weight"),
    "diffusion_model_AB": (lambda m: f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight"),
    "lora_unet": (lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
    "wan_fun": (lambda m: "lora_unet__" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
    "diffusers": (lambda m: f"transformer.{diffusers_name(m)}", ".lora_A.weight", ".lora_B.weight"),
    "diffusers_bare": (diffusers_name, ".lora_A.weight", ".lora_B.weight"),
}


def write_style(patches: list[LoraPatch], style: str) -> dict[str, torch.Tensor]:
    name, down_sfx, up_sfx = STYLES[style]
    sd: dict[str, torch.Tensor] = {}
    for p in patches:
        base = name(p.module)
        if p.up is not None:
            sd[base + up_sfx], sd[base + down_sfx] = p.up, p.down
            if p.alpha is not None:
                sd[base + ".alpha"] = torch.tensor(p.alpha)
        for part in ("diff", "diff_b"):
            if getattr(p, part) is not None:
                sd[f"{base}.{part}"] = getattr(p, part)
    return sd


def random_lora(dims, seed: int = 0, dyadic: bool = True, dtype=torch.float32) -> list[LoraPatch]:
    """Patches on every kind of module. Low-rank factors are dyadic when ``dyadic`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = PrunedWanMeta.teacher(dims).expected_shapes()

    def factor(*shape):
        if dyadic:
            return (torch.randint(-8, 9, shape, generator=gen).float() / 8).to(dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    def gauss(*shape):
        return torch.randn(shape, generator=gen).to(dtype)

    def low_rank(module, rank, alpha, bias=False):
        w = shapes[f"{module}.weight"]
        return LoraPatch(module, up=factor(w[0], rank), down=factor(rank, *w[1:]), alpha=alpha,
                         diff_b=gauss(w[0]) if bias else None)

    def diff(module, bias=False):
        key = module if module.endswith("modulation") else f"{module}.weight"
        return LoraPatch(module, diff=gauss(*shapes[key]), diff_b=gauss(*shapes[f"{module}.bias"]) if bias else None)

    out: list[LoraPatch] = []
    for i in range(dims.num_layers):
        b = f"blocks.{i}."
        use_diff = i % 2 == 1  # odd blocks carry full .diff tensors on the pruned layers, even ones low-rank pairs
        for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0", "ffn.2"):
            bias = name in ("self_attn.q", "self_attn.o", "ffn.0")
            out.append(diff(b + name, bias) if use_diff else low_rank(b + name, 4, (2.0, None, 8.0)[i % 3], bias))
        for name in ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"):
            out.append(low_rank(b + name, 8, 4.0, bias=name == "cross_attn.o"))
        out += [diff(b + "self_attn.norm_q"), diff(b + "self_attn.norm_k"), diff(b + "cross_attn.norm_q"),
                diff(b + "norm3", bias=True), diff(b + "modulation")]
        if dims.variant == "i2v":
            out += [low_rank(b + "cross_attn.k_img", 4, 4.0), low_rank(b + "cross_attn.v_img", 4, None),
                    diff(b + "cross_attn.norm_k_img")]
    out += [low_rank("head.head", 4, 2.0, bias=True), diff("head.modulation"), low_rank("patch_embedding", 4, 4.0),
            low_rank("text_embedding.0", 4, None), low_rank("time_embedding.0", 4, 2.0),
            low_rank("time_projection.1", 4, 2.0)]
    if dims.variant == "i2v":
        out.append(low_rank("img_emb.proj.1", 4, 2.0))
    return out


# -- LoRA files ------------------------------------------------------------------------------------------

def make_lora(dims: WanDims, seed: int, modulation: bool = True, low_rank: bool = True) -> list[LoraPatch]:
    """Patches on the pruned layers (q/k/v/o, ffn, their biases and norms) and outside the blocks.

    Factors are dyadic (see the module docstring) and small, so the LoRA changes the output without blowing up.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = PrunedWanMeta.teacher(dims).expected_shapes()

    def pair(module: str, alpha: float, bias: bool = False) -> LoraPatch:
        w = shapes[f"{module}.weight"]
        up = torch.randint(-8, 9, (w[0], 4), generator=gen) / 128
        down = torch.randint(-8, 9, (4, *w[1:]), generator=gen) / 128
        diff_b = 0.02 * torch.randn(w[0], generator=gen) if bias else None
        return LoraPatch(module, up=up, down=down, alpha=alpha, diff_b=diff_b)

    def diff(module: str, key: str) -> LoraPatch:
        return LoraPatch(module, diff=0.05 * torch.randn(shapes[key], generator=gen))

    out: list[LoraPatch] = []
    for i in range(dims.num_layers):
        b = f"blocks.{i}."
        if low_rank:
            for n, alpha, bias in (("self_attn.q", 8.0, True), ("self_attn.k", 2.0, False), ("self_attn.v", 4.0, False),
                                   ("self_attn.o", 4.0, True), ("cross_attn.q", 4.0, False),
                                   ("cross_attn.o", 2.0, False), ("ffn.0", 4.0, True), ("ffn.2", 8.0, False)):
                out.append(pair(b + n, alpha, bias))
            out += [diff(b + "self_attn.norm_q", b + "self_attn.norm_q.weight"),
                    diff(b + "self_attn.norm_k", b + "self_attn.norm_k.weight")]
        if modulation:
            out.append(diff(b + "modulation", b + "modulation"))
    if low_rank:
        out += [pair("head.head", 4.0, bias=True), pair("patch_embedding", 2.0), pair("text_embedding.0", 4.0),
                pair("time_projection.1", 4.0)]
    if modulation:
        out.append(diff("head.modulation", "head.modulation"))
    return out


def _diffusers(module: str) -> str:
    return f"transformer.{diffusers_module(module)}"


FILE_STYLES = {  # style -> (module -> key prefix, down suffix, up suffix)
    "diffusion_model": (lambda m: f"diffusion_model.{m}", ".lora_down.weight", ".lora_up.weight"),
    "lora_A_B": (lambda m: f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight"),
    "lora_unet": (lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
    "diffusers": (_diffusers, ".lora_A.weight", ".lora_B.weight"),
    "dense_diff": (lambda m: f"diffusion_model.{m}", None, None),  # every pair as its exact full .diff
}


def write_lora(path: Path, patches: list[LoraPatch], style: str = "diffusion_model",
               extra: dict[str, torch.Tensor] | None = None) -> str:
    name, down_sfx, up_sfx = FILE_STYLES[style]
    sd: dict[str, torch.Tensor] = dict(extra or {})
    for p in patches:
        base = name(p.module)
        if p.up is not None and down_sfx is None:
            product = (p.alpha / p.down.shape[0]) * (p.up @ p.down.flatten(1))  # exact: dyadic factors
            sd[f"{base}.diff"] = product.reshape(p.up.shape[0], *p.down.shape[1:])
        elif p.up is not None:
            sd[base + up_sfx], sd[base + down_sfx] = p.up, p.down
            sd[f"{base}.alpha"] = torch.tensor(p.alpha)
        for part in ("diff", "diff_b"):
            if getattr(p, part) is not None:
                sd[f"{base}.{part}"] = getattr(p, part)
    save_atomic(path, sd, {"format": "pt"})
    return path.name
