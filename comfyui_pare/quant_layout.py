"""ComfyUI's two layouts of scaled fp8 checkpoints, and the one PARE keeps internally.

* The *marker* layout (``*_fp8_scaled`` releases; what ComfyUI 0.3.x reads): a ``scaled_fp8`` marker tensor whose
  dtype is the fp8 dtype (2 elements: no fp8 matmuls), and ``<layer>.scale_weight`` / ``<layer>.scale_input``.
* The *per-layer* layout (ComfyUI 0.8 and later; it converts marker files to it on load with
  ``comfy.utils.convert_old_quants``): ``<layer>.weight_scale`` / ``<layer>.input_scale`` and, per quantized layer, a
  ``<layer>.comfy_quant`` uint8 tensor holding a JSON config such as ``{"format": "float8_e4m3fn"}``; or the same
  configs in the header's ``_quantization_metadata`` JSON (``{"layers": {layer: config}}``).

PARE reads both and keeps scales by canonical kind (``scale_weight``/``scale_input``, as the marker layout names
them); it writes a student in its teacher's layout. It reads per-tensor fp8 formats only: a pruned row or column of
a block-scaled format (nvfp4, mxfp8) would cut its scale blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .errors import PareFormatError
from .untrusted import load_json, quote

MARKER, PER_LAYER = "scaled_fp8", "per-layer"
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT, SCALE_INPUT = "scale_weight", "scale_input"  # canonical kinds (the marker layout's names)
COMFY_QUANT = "comfy_quant"
QUANT_METADATA = "_quantization_metadata"
# Stored suffix -> (layout, canonical kind).
SCALE_SUFFIXES = {
    "scale_weight": (MARKER, SCALE_WEIGHT), "scale_input": (MARKER, SCALE_INPUT),
    "weight_scale": (PER_LAYER, SCALE_WEIGHT), "input_scale": (PER_LAYER, SCALE_INPUT),
}
STORED_NAME = {(MARKER, SCALE_WEIGHT): "scale_weight", (MARKER, SCALE_INPUT): "scale_input",
               (PER_LAYER, SCALE_WEIGHT): "weight_scale", (PER_LAYER, SCALE_INPUT): "input_scale"}
PER_TENSOR_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
MAX_CONFIG_BYTES = 4096  # one layer's JSON config; real ones are a few dozen bytes


@dataclass(frozen=True)
class LayerQuant:
    """One quantized layer's config in the per-layer layout."""

    fmt: str
    full_precision_matrix_mult: bool = False
    raw: str = ""  # the JSON as stored, written back unchanged

    @property
    def dtype(self) -> torch.dtype:
        return PER_TENSOR_FORMATS[self.fmt]

    def encode(self) -> torch.Tensor:
        return torch.tensor(list(self.raw.encode("utf-8")), dtype=torch.uint8)


def parse_layer_config(text: str, where: str) -> LayerQuant:
    """A per-layer config from its JSON; only per-tensor fp8 formats."""
    conf = load_json(text, f"{where}: quantization config", MAX_CONFIG_BYTES, PareFormatError)
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise PareFormatError(f"{where}: quantization config {quote(text)} has no 'format' string")
    fmt = conf["format"]
    if fmt not in PER_TENSOR_FORMATS:
        raise PareFormatError(f"{where}: quantization format '{fmt[:40]}' is not one PARE can prune (per-tensor "
                              f"{', '.join(PER_TENSOR_FORMATS)}); use the bf16/fp16 or fp8_scaled release")
    return LayerQuant(fmt, bool(conf.get("full_precision_matrix_mult", False)), text)


def decode_config_tensor(t: torch.Tensor, where: str) -> LayerQuant:
    if t.dtype != torch.uint8 or t.ndim != 1:
        raise PareFormatError(f"{where}: a '.{COMFY_QUANT}' tensor must be 1-D uint8 JSON bytes, got {t.dtype} "
                              f"{list(t.shape)}")
    try:
        text = bytes(t.tolist()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PareFormatError(f"{where}: quantization config is not UTF-8 ({e})") from e
    return parse_layer_config(text, where)


def header_layer_configs(metadata: dict[str, str], source: str) -> dict[str, LayerQuant]:
    """The per-layer configs of a ``_quantization_metadata`` header entry, by layer name (no prefix handling)."""
    text = metadata.get(QUANT_METADATA)
    if text is None:
        return {}
    obj = load_json(text, f"{source}: header '{QUANT_METADATA}'", error=PareFormatError)
    layers = obj.get("layers") if isinstance(obj, dict) else None
    if not isinstance(layers, dict):
        raise PareFormatError(f"{source}: header '{QUANT_METADATA}' is not a JSON object with 'layers'")
    return {str(name): parse_layer_config(json.dumps(conf), f"{source}: '{QUANT_METADATA}' layer '{name}'")
            for name, conf in layers.items()}


def marker_for(configs: list[LayerQuant], source: str) -> torch.Tensor:
    """The ``scaled_fp8`` marker that makes a 0.3.x ComfyUI read per-layer fp8 weights the same way: one fp8 dtype
    for every layer; 2 elements where the layers ask for full-precision matrix multiplies."""
    dtypes = {c.dtype for c in configs}
    full = {c.full_precision_matrix_mult for c in configs}
    if len(dtypes) != 1 or len(full) != 1:
        raise PareFormatError(f"{source}: mixes fp8 formats across layers, which ComfyUI releases before 0.8 "
                              "cannot run (they read one scaled_fp8 dtype per model); use ComfyUI 0.8 or later")
    return torch.zeros(2 if full.pop() else 0, dtype=dtypes.pop())
