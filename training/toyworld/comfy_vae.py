"""ComfyUI's own Wan2.1 VAE class (``comfy.ldm.wan.vae.WanVAE``) at a small base dim, usable outside ComfyUI.

The toy VAE *is* ComfyUI's class so that the saved file loads with the stock ``VAELoader`` unchanged: ComfyUI
recognises a Wan2.1 VAE by its keys and reads only the base dim (``decoder.head.0.gamma``); everything else is
fixed (z_dim 16, dim_mult [1, 2, 4, 4], 2 residual blocks per level, temporal downsampling [F, T, T]).

Pitfalls handled here (docs/comfyui_notes.md): ComfyUI's ops leave weights uninitialised, so every layer gets torch's
default init; the temporal downsampling happens only in the feature-cache loop of ``encode``/``decode``.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from comfy_library import import_comfy

Z_DIM = 16


def wan_vae_class() -> type[nn.Module]:
    """Import ``comfy.ldm.wan.vae.WanVAE`` from the pinned ComfyUI tree (no argument parsing of our argv)."""
    import_comfy("cuda" if torch.cuda.is_available() else "cpu")
    return importlib.import_module("comfy.ldm.wan.vae").WanVAE


def build_vae(dim: int, seed: int = 0) -> nn.Module:
    """A freshly initialised Wan2.1 VAE with ComfyUI's fixed layout and base ``dim``."""
    cls = wan_vae_class()
    vae = cls(dim=dim, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
              temperal_downsample=[False, True, True], dropout=0.0)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in vae.modules():  # ComfyUI's disable_weight_init ops skip init: use torch's defaults
        for base in (nn.Conv3d, nn.Conv2d, nn.Linear):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    torch.random.set_rng_state(gen_state)
    return vae


def vae_dim(state_dict: dict[str, torch.Tensor]) -> int:
    """The base dim of a Wan2.1 VAE state dict, read where ComfyUI reads it."""
    key = "decoder.head.0.gamma"
    if key not in state_dict:
        raise KeyError(f"not a Wan2.1 VAE state dict: no '{key}'")
    return int(state_dict[key].shape[0])


def load_vae(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    vae = build_vae(vae_dim(state_dict))
    vae.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return vae.eval()
