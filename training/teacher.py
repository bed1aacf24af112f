"""The one way training reads a Wan checkpoint (teacher or student), whatever layout the user has.

Every layout ``comfyui_pare.wan_reader`` reads (original single or sharded, ComfyUI-prefixed, diffusers, fp8_scaled,
T2V/I2V, Wan2.2 experts) gives the same state dict here: original key names; fp8_scaled weights dequantized to
float32 (weight x scale_weight, as ComfyUI computes them), every other tensor as stored.
"""

from __future__ import annotations

import os

import torch

from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan_reader import WanReader, open_wan

from .model import WanTransformer


def load_wan(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """State dict (original Wan key names, floating point) and metadata of a Wan checkpoint."""
    with open_wan(path) as reader:
        return reader.state_dict(dequantize=True), reader.meta


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
               device: torch.device | str | None = None) -> WanTransformer:
    """A ``WanTransformer`` with the checkpoint's per-block widths, loaded strictly, one tensor at a time straight
    into ``dtype`` on ``device`` (``WanTransformer.from_reader``)."""
    return read_model(path, dtype, device)[0]


def read_model(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
               device: torch.device | str | None = None) -> tuple[WanTransformer, WanReader]:
    """``load_model`` and the reader it used (its ``bytes_read`` and ``read_seconds``: the load throughput)."""
    with open_wan(path) as reader:
        return WanTransformer.from_reader(reader, dtype=dtype, device=device), reader
