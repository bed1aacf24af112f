"""PARE Load Conditioning (test-only): text (and CLIP-vision) embeddings saved as tensors, for the tiny models.

A real Wan2.1 is conditioned by umT5-XXL through the stock CLIP nodes. Tiny Wan models (other text dims) and
reproducible tests need conditioning without a 5.7B text encoder: this node reads a safetensors file from
the input folder holding ``context`` [L, text_dim] or [B, L, text_dim] and, for I2V, optionally ``clip_fea``
[257, 1280] (CLIP ViT-H penultimate states), and returns ComfyUI CONDITIONING. It is not shipped: artists use the
stock text encoder nodes (real Wan) or PARE Toy Text Encode (toy world). The node ID is kept from when it was.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy.clip_vision import Output as ClipVisionOutput
from comfy_api.latest import io

# The core comes from the pack's editable install in the test environment (scripts/setup_env.sh).
from comfyui_pare.errors import PareFormatError
from comfyui_pare.safetensors_io import load_tensors


def safetensors_in_input() -> list[str]:
    root = folder_paths.get_input_directory()
    return sorted(f for f in os.listdir(root) if f.endswith(".safetensors")) if os.path.isdir(root) else []


def _batched(t: torch.Tensor, key: str, path: str, last: int | None = None) -> torch.Tensor:
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or (last is not None and t.shape[-1] != last) or not t.is_floating_point():
        want = f"[L, {last}]" if last else "[L, D] or [B, L, D]"
        raise PareFormatError(f"{path}: tensor '{key}' has shape {list(t.shape)} ({t.dtype}), expected {want} floats")
    return t.float()


class PARELoadConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARELoadConditioning",
            display_name="PARE Load Conditioning (tensors)",
            category="testing",
            description=(
                "Loads precomputed conditioning from a .safetensors file in the input folder: 'context' "
                "[L, text_dim] text embeddings and optional 'clip_fea' [257, 1280] image features (I2V). Used by "
                "the tiny demo models, which have no text encoder."
            ),
            inputs=[
                io.Combo.Input(
                    "file", options=safetensors_in_input(),
                    tooltip="A .safetensors file in ComfyUI's input folder with a 'context' tensor "
                            "(and optionally 'clip_fea').",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for KSampler or WanImageToVideo.")],
        )

    @classmethod
    def execute(cls, file: str) -> io.NodeOutput:
        path = folder_paths.get_annotated_filepath(file)
        tensors, _ = load_tensors(path)
        if "context" not in tensors:
            raise PareFormatError(f"{path}: no 'context' tensor (found {sorted(tensors)[:5]})")
        cond: dict = {}
        if "clip_fea" in tensors:
            out = ClipVisionOutput()
            out.penultimate_hidden_states = _batched(tensors["clip_fea"], "clip_fea", path, last=1280)
            cond["clip_vision_output"] = out
        return io.NodeOutput([[_batched(tensors["context"], "context", path), cond]])
