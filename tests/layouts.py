"""Writers of the Wan checkpoint layouts users download, with the real key spelling of each release, for the tests.

Each writer takes a state dict in the original layout and writes it the way that release does, so a reader
test can check that every layout gives back the same model. The names are written out here by hand (the
diffusers names come from ``helpers.DIFFUSERS_*_NAMES``), never taken from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import diffusers_module

from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import WanDims
from training import tiny

# The linear layers ComfyUI's scaled fp8 files store in fp8 with a scale (its ops.Linear modules).
SCALED_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2",
                  "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
                  "head.head", "img_emb.proj.1", "img_emb.proj.3")


def is_scaled_linear(key: str) -> bool:
    module = key.removesuffix(".weight")
    local = module.split(".", 2)[2] if module.startswith("blocks.") else module
    return key.endswith(".weight") and local in SCALED_LINEARS


def write_original(path: Path, sd: dict[str, torch.Tensor], prefix: str = "") -> Path:
    """Wan-AI's names (``prefix`` '' ), or ComfyUI's repackaged files ('model.diffusion_model.' / 'diffusion_model.')."""
    save_atomic(path, {prefix + k: v for k, v in sd.items()}, {"format": "pt"})
    return path


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``
    (Wan-AI's 14B releases and the Wan2.2-A14B expert folders; diffusers' sharded transformers alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_atomic(folder / name, {k: sd[k] for k in part}, {"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``WanTransformer3DModel`` state dict of an original one."""
    out = {}
    for key, v in sd.items():
        if key.endswith("modulation"):
            out[diffusers_module(key)] = v  # scale_shift_table: a bare parameter
        else:
            module, suffix = key.rsplit(".", 1)
            out[f"{diffusers_module(module)}.{suffix}"] = v
    return out


def scale_to_fp8(sd: dict[str, torch.Tensor], other_dtype: torch.dtype = torch.bfloat16,
                 marker_elements: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout of every linear its scaled files quantize (``training.tiny.scale_to_fp8``), the rest
    in ``other_dtype``."""
    return tiny.scale_to_fp8(sd, lambda key, _: is_scaled_linear(key), other_dtype, marker_elements)


def to_per_layer(scaled: dict[str, torch.Tensor], in_header: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The same scaled fp8 weights in ComfyUI 0.8's per-layer layout (what its ``convert_old_quants`` makes of the
    marker layout): ``weight_scale`` / ``input_scale`` (a scale of 1.0 dropped) and a ``.comfy_quant`` JSON config
    per layer, as uint8 tensors or, ``in_header``, in the ``_quantization_metadata`` header. (state dict, metadata)"""
    marker = scaled["scaled_fp8"]
    conf = {"format": "float8_e4m3fn", **({"full_precision_matrix_mult": True} if marker.numel() == 2 else {})}
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for key, v in scaled.items():
        if key == "scaled_fp8":
            continue
        if key.endswith(".scale_weight"):
            base = key.removesuffix(".scale_weight")
            out[f"{base}.weight_scale"] = v
            layers[base] = conf
        elif key.endswith(".scale_input"):
            if float(v) != 1.0:
                out[key.removesuffix(".scale_input") + ".input_scale"] = v
        else:
            out[key] = v
    if in_header:
        return out, {"format": "pt", "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    for base, c in layers.items():
        out[f"{base}.comfy_quant"] = torch.tensor(list(json.dumps(c).encode("utf-8")), dtype=torch.uint8)
    return out, {"format": "pt"}


def dequantize(scaled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the scaled weights mean: weight * scale_weight in fp32 (scales and marker dropped)."""
    out = {}
    for key, v in scaled.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = scaled.get(key.removesuffix(".weight") + ".scale_weight")
        out[key] = v.float() * scale if scale is not None else v
    return out


T2V = WanDims(dim=256, num_heads=2, ffn_dim=128, num_layers=2, text_dim=32)  # head dim 128: no metadata needed


def write_layout(kind: str, root: Path, sd: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if kind == "original":
        return write_original(root / "wan.safetensors", sd)
    if kind in ("model.diffusion_model.", "diffusion_model."):
        return write_original(root / "wan.safetensors", sd, prefix=kind)
    if kind == "sharded":  # the official release folder: shards + *.safetensors.index.json
        write_sharded(root / "Wan2.1-T2V-14B", sd)
        return root / "Wan2.1-T2V-14B"
    if kind == "diffusers-file":
        return write_original(root / "diffusion_pytorch_model.safetensors", to_diffusers(sd))
    if kind == "diffusers-folder":
        write_sharded(root / "transformer", to_diffusers(sd), shards=2)
        return root / "transformer"
    raise AssertionError(kind)
