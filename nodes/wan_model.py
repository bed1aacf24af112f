"""Build ComfyUI's own Wan model with per-block widths, through the running ComfyUI's own loader.

ComfyUI's detection assumes head dim 128, text dim 4096 and one FFN width for all blocks, so a pruned checkpoint
cannot go through the stock loader unchanged. Rather than re-implement that loader (its quantization handling,
dtype choice, operations, weight assignment and patcher class all change between releases), we call the running
ComfyUI's ``comfy.sd.load_diffusion_model_state_dict`` and correct only what detection gets wrong: while our load
runs, on our thread, ``model_detection.model_config_from_unet``'s result gets the file's dims and a block factory
that builds each ``WanAttentionBlock`` at its own widths. Everything else (``convert_old_quants`` and
``quant_config`` on newer releases, the ``scaled_fp8`` marker on older ones, ``CoreModelPatcher`` /
``ModelPatcherDynamic``, ``assign=`` loading) is whatever the running release does for a stock Wan.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Callable, Iterator, Sequence

import torch

from ..comfyui_pare.errors import PareFormatError
from ..comfyui_pare.pruned import FP8_MATMUL_MULTIPLE, PrunedWanMeta, unaligned_widths
from ..comfyui_pare.wan import BlockWidth
from .comfy_compat import ComfyVersionError, ModelPatcher, comfy_version, internals

logger = logging.getLogger(__name__)

# weight_dtype choices of the stock UNETLoader, with the model options it sets for each.
WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def _narrow_self_attention(attn: torch.nn.Module, num_heads: int, operation_settings: dict) -> None:
    """Re-create q/k/v/o and the q/k RMSNorms of one self-attention at ``num_heads`` kept heads.

    Widths come from the module's attributes, never from its weights: with DynamicVRAM, ComfyUI's operations leave
    ``weight`` as None until the state dict is loaded."""
    ops, device, dtype = (operation_settings.get(k) for k in ("operations", "device", "dtype"))
    dim, inner = attn.dim, num_heads * attn.head_dim
    if num_heads == attn.num_heads:
        return
    for name in ("q", "k", "v"):
        setattr(attn, name, ops.Linear(dim, inner, device=device, dtype=dtype))
    attn.o = ops.Linear(inner, dim, device=device, dtype=dtype)
    for name in ("norm_q", "norm_k"):
        if not isinstance(getattr(attn, name), torch.nn.Identity):  # qk_norm=False keeps Identity
            setattr(attn, name, ops.RMSNorm(inner, eps=attn.eps, elementwise_affine=True, device=device, dtype=dtype))
    attn.num_heads = num_heads  # head_dim stays the teacher's, so RoPE is unchanged


class PrunedBlockFactory:
    """Passed to WanModel as ``wan_attn_block_class``: builds block i with the i-th widths.

    WanModel calls it once per block, in order, without the index; the count wraps, so a second build of the same
    model (a clone that re-creates it) gets the same widths."""

    def __init__(self, widths: Sequence[BlockWidth]):
        self._widths = list(widths)
        self._built = 0

    def __call__(self, cross_attn_type, dim, ffn_dim, num_heads, *args, operation_settings=None, **kwargs):
        width = self._widths[self._built % len(self._widths)]
        self._built += 1
        block = internals.wan_attention_block(cross_attn_type, dim, width.ffn_dim, num_heads, *args,
                                  operation_settings=operation_settings, **kwargs)
        _narrow_self_attention(block.self_attn, width.num_heads, operation_settings)
        block.num_heads = width.num_heads
        return block

    def __repr__(self) -> str:
        return f"PrunedBlockFactory({len(self._widths)} blocks)"


def _correct_config(model_config, meta: PrunedWanMeta, source: str) -> None:
    """Check ComfyUI's detection against the file's metadata and give it the dims detection cannot read."""
    config = model_config.unet_config if model_config is not None else {}
    spec = meta.dims.spec
    if config.get("image_model") != "wan2.1":  # ComfyUI's detection name for every Wan family
        raise PareFormatError(f"{source}: ComfyUI {comfy_version()} does not recognise this file as a Wan model")
    if config.get("model_type") != spec.model_type:
        raise PareFormatError(f"{source}: ComfyUI detects a Wan '{config.get('model_type')}' model but the "
                              f"metadata says {spec.title} ('{spec.model_type}')")
    # Detection assumes head dim 128 and text dim 4096 and reads the FFN width of block 0 only.
    config.update(num_heads=meta.dims.num_heads, ffn_dim=meta.dims.ffn_dim, text_dim=meta.dims.text_dim)
    if meta.dims.vace_layers and (config.get("vace_layers"), config.get("vace_in_dim")) != (
            meta.dims.vace_layers, meta.dims.vace_in_dim):
        raise PareFormatError(f"{source}: ComfyUI detects {config.get('vace_layers')} VACE blocks of "
                              f"{config.get('vace_in_dim')} channels, the metadata says {meta.dims.vace_layers} of "
                              f"{meta.dims.vace_in_dim}")
    if meta.is_pruned:
        config["wan_attn_block_class"] = PrunedBlockFactory(meta.blocks)


_DETECTION_LOCK = threading.Lock()


def _vace_builder(original: Callable, owner: int) -> Callable:
    """Stands in for ``VaceWanModel`` while our load runs: ComfyUI's VaceWanModel takes no ``wan_attn_block_class``,
    so on our thread the model is built as stock, then its main blocks are rebuilt by the factory (the VACE blocks
    stay the teacher's). The stock main blocks exist briefly first: a pruned VACE load peaks at the teacher's main
    block size until they are dropped (before any weight is assigned). Other threads get the stock class unchanged."""
    def build(*args, wan_attn_block_class=None, **kwargs):
        model = original(*args, **kwargs)
        if wan_attn_block_class is not None and threading.get_ident() == owner:
            settings = {"operations": kwargs.get("operations"), "device": kwargs.get("device"),
                        "dtype": kwargs.get("dtype")}
            model.blocks = torch.nn.ModuleList(
                wan_attn_block_class("t2v_cross_attn", model.dim, model.ffn_dim, model.num_heads, model.window_size,
                                     model.qk_norm, model.cross_attn_norm, model.eps, operation_settings=settings)
                for _ in range(len(model.blocks)))
        return model
    return build


@contextlib.contextmanager
def _detection_corrected(meta: PrunedWanMeta, source: str) -> Iterator[list]:
    """While the block runs, detection on this thread returns configs corrected for ``meta``; other threads (another
    node pack loading a model at the same time) see ComfyUI's detection unchanged. Yields the configs corrected."""
    original: Callable = internals.model_config_detector()
    owner, corrected = threading.get_ident(), []

    def detect(*args, **kwargs):
        model_config = original(*args, **kwargs)
        if threading.get_ident() == owner:
            _correct_config(model_config, meta, source)
            corrected.append(model_config)
        return model_config

    vace = internals.vace_model_class()
    with _DETECTION_LOCK:
        internals.set_model_config_detector(detect)
        if vace is not None and meta.dims.vace_layers and meta.is_pruned:
            internals.set_vace_model_class(_vace_builder(vace, owner))
        try:
            yield corrected
        finally:
            internals.set_model_config_detector(original)
            if vace is not None:
                internals.set_vace_model_class(vace)


def quant_layout_for_comfy() -> str | None:
    """The scaled fp8 layout to hand the running ComfyUI: as stored where it converts layouts itself
    (``comfy.utils.convert_old_quants``, 0.8 and later), else the ``scaled_fp8`` marker layout that 0.3.x reads."""
    return None if internals.converts_old_quants() else "scaled_fp8"


def _accepted(fn: Callable, **kwargs) -> dict:
    """The keyword arguments ``fn`` takes in the running ComfyUI (older releases lack ``metadata``, ...)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


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
    sd: dict[str, torch.Tensor], meta: PrunedWanMeta, model_options: dict | None = None, source: str = "model",
    metadata: dict[str, str] | None = None, disable_dynamic: bool | None = None,
) -> ModelPatcher:
    """The running ComfyUI's own model and patcher for a validated (pruned or plain) Wan state dict in the original
    key layout; consumes ``sd``. ``metadata``: the file's safetensors header metadata (newer releases read their
    quantization layout from it); ``disable_dynamic``: passed on where the running loader has it."""
    model_options = dict(model_options or {})
    if model_options.get("fp8_optimizations") or "scaled_fp8" in sd or any(k.endswith(".comfy_quant") for k in sd):
        warn_fp8_unfriendly_widths(meta, source)
    load = internals.diffusion_model_loader()
    kwargs = _accepted(load, metadata=metadata, disable_dynamic=disable_dynamic)
    if disable_dynamic is None:
        kwargs.pop("disable_dynamic", None)
    with _detection_corrected(meta, source) as corrected:
        patcher = load(sd, model_options=model_options, **kwargs)
    if not corrected:
        raise ComfyVersionError(
            f"PARE Load Pruned Wan cannot run on ComfyUI {comfy_version()}: its comfy.sd.load_diffusion_model_state_dict "
            "no longer detects models through comfy.model_detection.model_config_from_unet, which the pack uses to "
            "give ComfyUI the pruned widths. Please report this ComfyUI version to comfyui-pare.")
    if patcher is None:
        raise PareFormatError(f"{source}: ComfyUI {comfy_version()} could not build a {meta.dims.spec.title} model "
                              "from this file")
    # The factory is a build-time detail; keep the stored config plain (it may be saved or printed).
    patcher.model.model_config.unet_config.pop("wan_attn_block_class", None)
    return patcher
