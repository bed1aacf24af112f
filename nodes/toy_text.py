"""PARE Toy Text Encode: the toy world's text encoder (models/text_encoders) + a prompt -> CONDITIONING."""

from __future__ import annotations

import torch

from ..comfyui_pare.toy_text import ToyTextEncoder
from .comfy_compat import internals, io, require
from .folders import file_fingerprint

TEXT_ENCODERS = "text_encoders"
_cache: dict[str, ToyTextEncoder] = {}  # fingerprint -> encoder: a graph encodes cond and uncond with one file


def _encoder(name: str) -> ToyTextEncoder:
    key = file_fingerprint(TEXT_ENCODERS, name)
    if key not in _cache:
        _cache.clear()
        _cache[key] = ToyTextEncoder.load(internals.full_path_or_raise(TEXT_ENCODERS, name))
    return _cache[key]


class PAREToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PAREToyTextEncode",
            display_name="PARE Toy Text Encode",
            category="PARE/conditioning",
            description=(
                "Encodes a prompt with the PARE toy world's text encoder (a learned word + position embedding, "
                "zero-padded like umT5's output), for the toy Wan2.1 teacher and its PARE students. It knows "
                "only the toy grammar: 'a red circle moving left', two objects joined by 'and'. An empty prompt "
                "gives the all-zero conditioning the toy models use as their negative."
            ),
            inputs=[
                io.Combo.Input(
                    "text_encoder", options=internals.filename_list(TEXT_ENCODERS),
                    tooltip="The toy text encoder .safetensors in models/text_encoders "
                            "(pare_toy_text.safetensors from `make demo`).",
                ),
                io.String.Input(
                    "text", multiline=True, default="a red circle moving right",
                    tooltip="Colour (red, green, blue, yellow), shape (circle, square, triangle), direction "
                            "(left, right, up, down); e.g. 'a blue square moving up and a yellow circle moving "
                            "left'.",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for KSampler (positive or negative).")],
        )

    @classmethod
    def fingerprint_inputs(cls, text_encoder: str, text: str) -> str:
        return f"{file_fingerprint(TEXT_ENCODERS, text_encoder)}:{text}"

    @classmethod
    def execute(cls, text_encoder: str, text: str) -> io.NodeOutput:
        require("PARE Toy Text Encode")
        with torch.no_grad():
            context = _encoder(text_encoder)([text])
        return io.NodeOutput([[context, {}]])
