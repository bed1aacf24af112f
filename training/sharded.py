"""Models that are never whole on one rank: built on the meta device, sharded by FSDP2, then each rank reads from
the checkpoint only the rows it owns.

Under ``strategy = "fsdp"`` a 14B teacher (28.6 GB in bf16) read whole by each of 8 ranks before sharding costs
8 x 28.6 GB of host memory. Here each rank

1. builds the model on the meta device (no storage) from the checkpoint's header (``comfyui_pare.wan_reader``);
2. applies FSDP2 ``fully_shard`` per block (``training.parallel.shard_module``), still on meta;
3. allocates only its shards (``to_empty``) and fills them one tensor at a time with the rows it owns
   (``WanReader.rows_into``: one plain read of the rows' bytes, straight into the shard when the file stores the
   dtype the model runs in, else read and converted; bf16, fp16, fp8 and fp8_scaled releases, every layout).

So a rank's host memory is about (model size / ranks) plus at most the one tensor slice being converted. FSDP2 shards every
parameter on its first dimension into ``world_size`` chunks of ceil(rows / world_size) (the last ones shorter or
empty): ``owned_rows`` computes the same and checks it against the local shard's shape.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from comfyui_pare.errors import PareFormatError
from comfyui_pare.wan_reader import open_wan

from .model import WanTransformer

FLOAT32_KEYS = ("patch_embedding.",)  # kept in float32 whatever the model's dtype (ComfyUI runs it in float32)


class RowSource(Protocol):
    """Where a parameter's values come from, a range of rows at a time, written into the parameter's storage."""

    def rows_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None: ...


class CheckpointRows:
    """Rows of a Wan checkpoint's tensors (any layout ``open_wan`` reads), cast to the model's dtype."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype) -> None:
        self.reader, self.dtype = open_wan(path), dtype

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        dtype = torch.float32 if key.startswith(FLOAT32_KEYS) else self.dtype
        return self.reader.rows(key, start, stop, dtype)

    def rows_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Straight from the file into ``out`` where the file stores its dtype (``WanReader.rows_into``)."""
        self.reader.rows_into(key, start, stop, out)


class TensorRows:
    """Rows of tensors already in memory (a small module's state, e.g. stage 2's router)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}

    def rows_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(self.tensors[key][start:stop].reshape(out.shape))


def meta_model(path: str | os.PathLike, dtype: torch.dtype) -> WanTransformer:
    """A ``WanTransformer`` of the checkpoint's widths on the meta device (no storage), in ``dtype``, the patch
    embedding in float32 (as ``WanTransformer.from_state_dict`` loads it)."""
    with open_wan(path) as reader:
        meta = reader.meta
    with torch.device("meta"):
        model = WanTransformer(meta)
    model.to(dtype)
    model.patch_embedding.float()
    return model.eval()


def owned_rows(param: torch.Tensor) -> tuple[int, int]:
    """(start, stop) of the first-dimension rows of ``param`` this rank holds: all of a plain tensor, FSDP2's
    chunk of a DTensor sharded on dim 0."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.ndim else 1
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a parameter sharded on dim 0 over a 1-d mesh, got placements {param.placements}")
    n, world = param.shape[0], param.device_mesh.size()
    chunk = -(-n // world)
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    local = param.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(f"FSDP2 holds {local.shape[0]} rows of a {n}-row parameter on this rank; expected "
                           f"rows {start}:{stop} (ceil-chunked)")
    return start, stop


def _source_for(name: str, sources: dict[str, RowSource]) -> tuple[RowSource, str]:
    for prefix in sorted(sources, key=len, reverse=True):
        if name.startswith(prefix):
            return sources[prefix], name[len(prefix):]
    raise PareFormatError(f"no source for parameter '{name}' (sources: {sorted(sources)})")


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, sources: dict[str, RowSource]) -> None:
    """Give a (sharded) meta-device model storage on ``device`` and fill each parameter's local rows from
    ``sources`` (parameter-name prefix -> source of the key after the prefix), one tensor at a time.

    Buffers are not in checkpoints: their values from before (the meta model's real buffers) are restored."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        source, key = _source_for(name, sources)
        start, stop = owned_rows(param)
        local = param.to_local() if isinstance(param, DTensor) else param
        if stop > start:
            source.rows_into(key, start, stop, local)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
