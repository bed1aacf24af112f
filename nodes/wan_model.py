"""Build ComfyUI's own Wan2.1 model with per-block widths, wrapped in ComfyUI's ModelPatcher.

ComfyUI's detection assumes head dim 128, text dim 4096 and one FFN width for all blocks, so a pruned
checkpoint cannot go through the stock loader. We follow ``comfy.sd.load_diffusion_model_state_dict`` step
by step (same dtype choice, same operations, same ModelPatcher) and only differ where the widths differ:
each block is built by ComfyUI's ``WanAttentionBlock`` with its own FFN width, and its self-attention
projections are re-created at the kept width with the same operations class, so fp8 weights, manual casting,
LoRA patching and memory management work exactly as for a stock Wan.
"""

from __future__ import annotations

import logging
from typing import Sequence

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import torch
from comfy.ldm.wan.model import WanAttentionBlock

from ..comfyui_pare.errors import PareFormatError
from ..comfyui_pare.pruned import FP8_MATMUL_MULTIPLE, PrunedWanMeta, unaligned_widths
from ..comfyui_pare.wan import BlockWidth

logger = logging.getLogger(__name__)

# weight_dtype choices of the stock UNETLoader, with the model options it sets for each.
WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def _narrow_self_attention(attn: torch.nn.Module, num_heads: int, operation_settings: dict) -> None:
    """Re-create q/k/v/o and the q/k RMSNorms of one self-attention at ``num_heads`` kept heads."""
    ops, device, dtype = (operation_settings.get(k) for k in ("operations", "device", "dtype"))
    dim, inner = attn.dim, num_heads * attn.head_dim
    if inner == attn.q.weight.shape[0]:
        return
    for name in ("q", "k", "v"):
        setattr(attn, name, ops.Linear(dim, inner, device=device, dtype=dtype))
    attn.o = ops.Linear(inner, dim, device=device, dtype=dtype)
    attn.norm_q = ops.RMSNorm(inner, eps=attn.eps, elementwise_affine=True, device=device, dtype=dtype)
    attn.norm_k = ops.RMSNorm(inner, eps=attn.eps, elementwise_affine=True, device=device, dtype=dtype)
    attn.num_heads = num_heads  # head_dim stays the teacher's, so RoPE is unchanged


class _PrunedBlockFactory:
    """Passed to WanModel as ``wan_attn_block_class``: builds block i with the i-th widths."""

    def __init__(self, widths: Sequence[BlockWidth]):
        self._widths = list(widths)
        self._built = 0

    def __call__(self, cross_attn_type, dim, ffn_dim, num_heads, *args, operation_settings=None, **kwargs):
        width = self._widths[self._built]
        self._built += 1
        block = WanAttentionBlock(cross_attn_type, dim, width.ffn_dim, num_heads, *args,
                                  operation_settings=operation_settings, **kwargs)
        _narrow_self_attention(block.self_attn, width.num_heads, operation_settings)
        block.num_heads = width.num_heads
        return block


def _model_config(sd: dict[str, torch.Tensor], meta: PrunedWanMeta, source: str):
    """ComfyUI's own model config for the file (``model_config_from_unet``, as the stock loader: this is also where
    the ``scaled_fp8`` marker is popped and scaled fp8 operations are chosen), corrected with the metadata's dims."""
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    config = model_config.unet_config if model_config is not None else {}
    if config.get("image_model") != "wan2.1":
        raise PareFormatError(f"{source}: ComfyUI does not recognise this file as a Wan2.1 model")
    if config.get("model_type") != meta.dims.variant:
        raise PareFormatError(
            f"{source}: ComfyUI detects a Wan '{config.get('model_type')}' model but the metadata says "
            f"'{meta.dims.variant}'"
        )
    # Detection assumes head dim 128 and text dim 4096 and reads the FFN width of block 0 only.
    config.update(num_heads=meta.dims.num_heads, ffn_dim=meta.dims.ffn_dim, text_dim=meta.dims.text_dim)
    return model_config


def warn_fp8_unfriendly_widths(meta: PrunedWanMeta, source: str) -> list[str]:
    """Warn (once per load) about widths fp8 matrix multiplies cannot take; returns the offending parts."""
    bad = unaligned_widths(meta, FP8_MATMUL_MULTIPLE)
    if bad:
        shown = ", ".join(bad[:6]) + (", ..." if len(bad) > 6 else "")
        logger.warning(
            "PARE: %s has %d width(s) that are not multiples of %d (%s). fp8 matrix multiplies (weight_dtype "
            "fp8_e4m3fn_fast, or an fp8_scaled file, on a GPU with fp8 support) need multiples of %d: there those "
            "layers fall back to slower dequantized matmuls (fp8_e4m3fn_fast) or fail (fp8_scaled). Prune to "
            "multiples of %d, or pick weight_dtype default / fp8_e4m3fn.",
            source, len(bad), FP8_MATMUL_MULTIPLE, shown, FP8_MATMUL_MULTIPLE, FP8_MATMUL_MULTIPLE)
    return bad


def build_wan_patcher(
    sd: dict[str, torch.Tensor], meta: PrunedWanMeta, model_options: dict | None = None, source: str = "model"
) -> comfy.model_patcher.ModelPatcher:
    """Create the ComfyUI model for a validated (pruned or plain) Wan state dict; consumes ``sd``."""
    model_options = model_options or {}
    # Counted before detection pops the scaled_fp8 marker, as the stock loader counts them.
    parameters = comfy.utils.calculate_parameters(sd)
    weight_dtype = comfy.utils.weight_dtype(sd)
    model_config = _model_config(sd, meta, source)
    if model_config.scaled_fp8 is not None:
        weight_dtype = None  # as the stock loader: scaled fp8 weights do not pick the compute dtype

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtype = model_options.get("dtype")
    if dtype is None:
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=weight_dtype)
    manual_cast_dtype = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    model_config.custom_operations = model_options.get("custom_operations", model_config.custom_operations)
    if model_options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True
    if model_config.optimizations.get("fp8", False):
        warn_fp8_unfriendly_widths(meta, source)

    if meta.is_pruned:
        model_config.unet_config["wan_attn_block_class"] = _PrunedBlockFactory(meta.blocks)
    try:
        model = model_config.get_model(sd, "")
    finally:
        # The factory is a build-time detail; keep the stored config plain (it may be saved or printed).
        model_config.unet_config.pop("wan_attn_block_class", None)
    model = model.to(offload_device)
    model.load_model_weights(sd, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    return patcher
