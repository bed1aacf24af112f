"""PARE Load Pruned Wan: a width-pruned (or plain) Wan checkpoint into ComfyUI's own sampler."""

from __future__ import annotations

import logging

from ..comfyui_pare.alignment import pad_state_dict
from ..comfyui_pare.errors import PareError
from ..comfyui_pare.pruned import METADATA_KEY, describe
from ..comfyui_pare.quant_layout import QUANT_METADATA
from ..comfyui_pare.wan_reader import open_wan, resolve_checkpoint
from .comfy_compat import internals, io, require
from .folders import DIFFUSION_MODELS, file_fingerprint
from .model_info import attach_meta
from .wan_model import WEIGHT_DTYPES, build_wan_patcher, quant_layout_for_comfy

logger = logging.getLogger(__name__)


def checkpoint_fingerprint(unet_name: str) -> str:
    """Path, mtime and size of every file the checkpoint is made of (all shards of a sharded release)."""
    path = internals.full_path(DIFFUSION_MODELS, unet_name)
    try:
        _, files, _ = resolve_checkpoint(path)
        return ";".join(f"{f}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files)
    except (PareError, OSError, TypeError):  # a missing or broken file: execute reports it properly
        return file_fingerprint(DIFFUSION_MODELS, unet_name)


class PARELoadPrunedWan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARELoadPrunedWan",
            display_name="PARE Load Pruned Wan",
            category="PARE/loaders",
            description=(
                "Loads a width-pruned Wan checkpoint (or a plain Wan file, read as 0% pruned) from "
                "models/diffusion_models, building ComfyUI's own Wan model with the per-block widths recorded "
                "in the file. Reads Wan-AI, ComfyUI-repackaged (fp8_scaled included), diffusers and sharded "
                "releases. Wan2.1 T2V/I2V/Fun-Control, Wan2.2 A14B experts and TI2V-5B, and Wan2.1 VACE; "
                "camera, S2V, HuMo and Animate files are refused by name. Works with every stock sampler, "
                "scheduler, CFG, LoRA patch and memory setting."
            ),
            inputs=[
                io.Combo.Input(
                    "unet_name", options=internals.filename_list(DIFFUSION_MODELS),
                    tooltip="A .safetensors Wan checkpoint in models/diffusion_models: a PARE student "
                            "(pruned widths in its metadata) or a plain Wan file (Wan-AI, ComfyUI "
                            "repackaged, fp8_scaled, diffusers). For a sharded release, keep its folder with the "
                            "index file and pick any shard: the whole release is loaded.",
                ),
                io.Combo.Input(
                    "weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                    tooltip="Storage dtype of the weights, as in the stock Load Diffusion Model node: fp8 "
                            "halves memory; fp8_e4m3fn_fast also uses fp8 matrix multiplies where supported "
                            "(the loader pads every width to a multiple of 64, which they need). fp8_scaled files "
                            "keep their own scaled fp8 weights.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The Wan model, ready for KSampler and the other PARE nodes.")],
        )

    @classmethod
    def fingerprint_inputs(cls, unet_name: str, weight_dtype: str) -> str:
        # Reload when the file on disk changes (e.g. a new export with the same name), or any shard of its release.
        return f"{checkpoint_fingerprint(unet_name)}:{weight_dtype}"

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str) -> io.NodeOutput:
        require("PARE Load Pruned Wan")
        return io.NodeOutput(load_pruned_wan(unet_name, weight_dtype))


def load_pruned_wan(unet_name: str, weight_dtype: str = "default", disable_dynamic: bool | None = None):
    """The model of PARE Load Pruned Wan. Also the patcher's ``cached_patcher_init``: newer ComfyUI releases call it
    to build a fresh copy (multi-GPU cloning, ``clone(disable_dynamic=True)``), with ``disable_dynamic``."""
    path = internals.full_path_or_raise(DIFFUSION_MODELS, unet_name)
    with open_wan(path) as reader:  # a shard of a sharded release loads the whole release, via its index
        meta, layout, scaled = reader.meta, reader.layout, reader.scaled_fp8
        source = str(reader.path)
        # ComfyUI's own layout: fp8 weights stay fp8 beside their scales, so the running ComfyUI's quantized
        # operations run them exactly as for the stock loader.
        sd = reader.state_dict(dequantize=False, quant_layout=quant_layout_for_comfy())
        # The per-layer quantization configs travel as .comfy_quant tensors (or as the marker layout): the header's
        # copy would be read a second time (0.8+) or by 0.3.75's different, older mixed-precision path.
        metadata = {k: v for k, v in reader.metadata.items() if k not in (METADATA_KEY, QUANT_METADATA)}
    sd, built = pad_state_dict(sd, meta, source=source)  # widths on the tensor-core grain (exact zero padding)
    patcher = build_wan_patcher(sd, built, dict(WEIGHT_DTYPES[weight_dtype]), source=source, metadata=metadata,
                                disable_dynamic=disable_dynamic)
    patcher.cached_patcher_init = (load_pruned_wan, (unet_name, weight_dtype))
    attach_meta(patcher, meta)  # the student's own widths: compute, reports, routers and LoRA slicing use them
    summary = describe(meta)
    logger.info(
        "PARE: loaded %s (%s layout%s, %s, %d blocks, %.0f%% heads, %.0f%% FFN kept)", unet_name, layout,
        ", fp8_scaled" if scaled else "", meta.dims.spec.title, meta.num_blocks,
        100 * summary["kept_heads_fraction"], 100 * summary["kept_ffn_fraction"],
    )
    return patcher
