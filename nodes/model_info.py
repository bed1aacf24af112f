"""What the pack knows about a loaded ComfyUI Wan model: its PARE metadata (widths, teacher dims)."""

from __future__ import annotations

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.model_family import UnsupportedFamily, family_from_comfy, require_supported
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.wan import WanDims
from .comfy_compat import ModelPatcher, internals

META_ATTR = "pare_meta"  # set on the BaseModel, which every clone of a ModelPatcher shares


def attach_meta(patcher: ModelPatcher, meta: PrunedWanMeta) -> None:
    setattr(patcher.model, META_ATTR, meta)


def model_meta(patcher: ModelPatcher) -> PrunedWanMeta:
    """The PARE metadata of a model from our loader, or a teacher description of a stock-loaded Wan (its family
    from ComfyUI's own detection); a Wan variant the pack cannot route is refused by name."""
    meta = getattr(patcher.model, META_ATTR, None)
    if meta is not None:
        return meta
    dm = getattr(patcher.model, "diffusion_model", None)
    config = internals.unet_config(patcher)
    if dm is None or config.get("image_model") != "wan2.1" or not hasattr(dm, "blocks"):
        raise PareError(
            f"this node needs a Wan model, got {type(dm).__name__ if dm is not None else 'no diffusion model'}"
        )
    wan = internals.wan_attributes(dm)
    try:
        fam = require_supported(family_from_comfy(config.get("model_type", "t2v"), wan["in_dim"], wan["out_dim"]),
                                f"the model ({type(dm).__name__})")
    except UnsupportedFamily as e:
        raise PareError(str(e)) from None
    vace = {k: wan[k] for k in ("vace_layers", "vace_in_dim") if k in wan}
    dims = WanDims(dim=wan["dim"], num_heads=wan["num_heads"], ffn_dim=wan["ffn_dim"], num_layers=wan["num_layers"],
                   text_dim=wan["text_dim"], in_dim=wan["in_dim"], out_dim=wan["out_dim"], variant=fam.cross_attn,
                   family=fam.name, **vace)
    return PrunedWanMeta.teacher(dims)
