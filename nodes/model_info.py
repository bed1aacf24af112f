"""What the pack knows about a loaded ComfyUI Wan model: its PARE metadata (widths, teacher dims)."""

from __future__ import annotations

import comfy.model_patcher

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.wan import WanDims

META_ATTR = "pare_meta"  # set on the BaseModel, which every clone of a ModelPatcher shares


def attach_meta(patcher: comfy.model_patcher.ModelPatcher, meta: PrunedWanMeta) -> None:
    setattr(patcher.model, META_ATTR, meta)


def model_meta(patcher: comfy.model_patcher.ModelPatcher) -> PrunedWanMeta:
    """The PARE metadata of a model from our loader, or a teacher description of a stock-loaded Wan2.1."""
    meta = getattr(patcher.model, META_ATTR, None)
    if meta is not None:
        return meta
    dm = getattr(patcher.model, "diffusion_model", None)
    if dm is None or type(dm).__name__ != "WanModel" or getattr(dm, "model_type", None) not in ("t2v", "i2v"):
        raise PareError(
            f"this node needs a Wan2.1 T2V/I2V model, got {type(dm).__name__ if dm is not None else 'no diffusion model'}"
        )
    dims = WanDims(dim=dm.dim, num_heads=dm.num_heads, ffn_dim=dm.ffn_dim, num_layers=len(dm.blocks),
                   text_dim=dm.text_dim, in_dim=dm.in_dim, out_dim=dm.out_dim, variant=dm.model_type)
    return PrunedWanMeta.teacher(dims)
