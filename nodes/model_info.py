"""What the pack knows about a loaded ComfyUI Wan model: its PARE metadata (widths, teacher dims)."""

from __future__ import annotations

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.wan import WanDims
from .comfy_compat import ModelPatcher, internals

META_ATTR = "pare_meta"  # set on the BaseModel, which every clone of a ModelPatcher shares


def attach_meta(patcher: ModelPatcher, meta: PrunedWanMeta) -> None:
    setattr(patcher.model, META_ATTR, meta)


def model_meta(patcher: ModelPatcher) -> PrunedWanMeta:
    """The PARE metadata of a model from our loader, or a teacher description of a stock-loaded Wan2.1."""
    meta = getattr(patcher.model, META_ATTR, None)
    if meta is not None:
        return meta
    dm = getattr(patcher.model, "diffusion_model", None)
    wan = internals.stock_wan_attributes(dm) if dm is not None else None
    if wan is None or wan["model_type"] not in ("t2v", "i2v"):
        raise PareError(
            f"this node needs a Wan2.1 T2V/I2V model, got {type(dm).__name__ if dm is not None else 'no diffusion model'}"
        )
    dims = WanDims(dim=wan["dim"], num_heads=wan["num_heads"], ffn_dim=wan["ffn_dim"], num_layers=wan["num_layers"],
                   text_dim=wan["text_dim"], in_dim=wan["in_dim"], out_dim=wan["out_dim"], variant=wan["model_type"])
    return PrunedWanMeta.teacher(dims)
