"""What the pack knows about a loaded ComfyUI Wan model: its PARE metadata (widths, teacher dims)."""

from __future__ import annotations

import comfy.model_patcher

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.model_family import UnsupportedFamily, family_from_comfy, require_supported
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.wan import WanDims

META_ATTR = "pare_meta"  # set on the BaseModel, which every clone of a ModelPatcher shares


def attach_meta(patcher: comfy.model_patcher.ModelPatcher, meta: PrunedWanMeta) -> None:
    setattr(patcher.model, META_ATTR, meta)


def model_meta(patcher: comfy.model_patcher.ModelPatcher) -> PrunedWanMeta:
    """The PARE metadata of a model from our loader, or a teacher description of a stock-loaded Wan (its family
    from ComfyUI's own detection); a Wan variant the pack cannot route is refused by name."""
    meta = getattr(patcher.model, META_ATTR, None)
    if meta is not None:
        return meta
    dm = getattr(patcher.model, "diffusion_model", None)
    config = getattr(getattr(patcher.model, "model_config", None), "unet_config", {}) or {}
    if dm is None or config.get("image_model") != "wan2.1" or not hasattr(dm, "blocks"):
        raise PareError(
            f"this node needs a Wan model, got {type(dm).__name__ if dm is not None else 'no diffusion model'}"
        )
    try:
        fam = require_supported(family_from_comfy(config.get("model_type", "t2v"), dm.in_dim, dm.out_dim),
                                f"the model ({type(dm).__name__})")
    except UnsupportedFamily as e:
        raise PareError(str(e)) from None
    vace = {"vace_layers": dm.vace_layers, "vace_in_dim": dm.vace_in_dim} if hasattr(dm, "vace_blocks") else {}
    dims = WanDims(dim=dm.dim, num_heads=dm.num_heads, ffn_dim=dm.ffn_dim, num_layers=len(dm.blocks),
                   text_dim=dm.text_dim, in_dim=dm.in_dim, out_dim=dm.out_dim, variant=fam.cross_attn,
                   family=fam.name, **vace)
    return PrunedWanMeta.teacher(dims)
