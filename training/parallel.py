"""torch.distributed for training: one code path from a single CPU process to 8 GPUs x N nodes under ``torchrun``.

* ``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the run is one
  process and nothing is initialised. NCCL on CUDA, gloo on the CPU.
* ``wrap_trainable``: ``ddp`` (DistributedDataParallel, every rank holds the whole student: small students) or
  ``fsdp`` (FSDP2 ``fully_shard`` on every transformer block, the patch embedding, then the root: parameters,
  gradients and optimizer state sharded across ranks; ``shard_module``). ``none`` for one process. A model built on
  the meta device (``training.sharded``) is sharded first, then each rank reads only its rows.
* ``shard_frozen``: the frozen teacher, the same way with ``reshard_after_forward`` so only one block's full weights
  exist at a time on each rank; replicated (plain module) otherwise.
* ``checkpoint_activations``: per-block activation checkpointing (inside each block's FSDP2 unit).

The training step draws the *global* batch's randomness from one generator on every rank and each rank takes
its slice, so a run gives the same result, within float tolerance, on any number of ranks.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from .sharded import RowSource, materialize

logger = logging.getLogger(__name__)

Strategy = Literal["auto", "none", "ddp", "fsdp"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> slice:
        """This rank's rows of a global batch (which must divide evenly)."""
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {self.world_size} ranks")
        n = global_batch // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_strategy(strategy: Strategy, info: DistInfo) -> Strategy:
    if strategy == "auto":
        return "ddp" if info.distributed else "none"
    if strategy in ("ddp", "fsdp") and not info.distributed:
        return "none"  # the same config runs as one process
    return strategy


def _mesh(info: DistInfo):
    return init_device_mesh(info.device.type, (info.world_size,))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (``model.blocks``), else the direct children."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else list(model.children())


def _units(model: nn.Module) -> list[nn.Module]:
    """What FSDP2 shards one by one: the blocks of every ``blocks`` list at any depth (stage 2's student sits
    inside ``GatedWan``), else the direct children."""
    lists = [m for name, m in model.named_modules() if name.rpartition(".")[2] == "blocks"
             and isinstance(m, nn.ModuleList)]
    return [b for blocks in lists for b in blocks] if lists else list(model.children())


def shard_module(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None, reshard: bool = True) -> None:
    """FSDP2 ``fully_shard`` on every block, on every ``patch_embedding``, then on the root (in place).

    ``MixedPrecisionPolicy``: parameters gathered in ``param_dtype`` (bf16 under ``mixed_precision = "bf16"``),
    gradients reduced in float32. The patch embedding is its own unit that keeps its float32 (the model runs it in
    float32 whatever the compute dtype, as ComfyUI does). Inputs are not cast (``cast_forward_inputs=False``):
    the model casts what it computes in itself, and a bf16 timestep (sigma * 1000, step 4 near 1000) would blur
    the time embedding."""
    mesh = _mesh(info)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    keep = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in _units(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "patch_embedding":
            fully_shard(module, mesh=mesh, mp_policy=keep, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # Training code may call the pieces of WanTransformer.forward directly (prepare / finish, as stage 2 does):
    # register them so FSDP gathers the root's parameters for them too.
    for name in ("prepare", "finish", "patch_embed"):
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)


def warm_up(strategy: Strategy, info: DistInfo) -> None:
    """Start FSDP2 once on a one-parameter meta module: its first ``fully_shard`` loads ~0.1 GB of code and state
    per process whatever the model, which belongs to the process baseline, not to the model's memory."""
    if resolve_strategy(strategy, info) == "fsdp":
        with torch.device("meta"):
            probe = nn.Linear(1, 1)
        fully_shard(probe, mesh=_mesh(info))


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, non-reentrant): memory per block falls from its intermediates to its input.
    Parameter names are unchanged, so state dicts and checkpoints are the same with or without it."""
    for block in _blocks(model):
        if getattr(block, "_pare_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._pare_checkpointed = True


def wrap_trainable(model: nn.Module, strategy: Strategy, info: DistInfo,
                   param_dtype: torch.dtype | None = None, sources: dict[str, RowSource] | None = None) -> nn.Module:
    """Move to the device and wrap for data parallelism. Returns the module to call in the training step.

    ``model`` itself stays the owner of the parameters (FSDP2 shards it in place; DDP wraps it), so state
    dicts and the optimizer use ``model``. ``param_dtype`` is FSDP2's compute dtype (mixed precision). A model
    on the meta device (``training.sharded``) is sharded first, then each rank reads its rows from ``sources``.
    """
    strategy = resolve_strategy(strategy, info)
    if _is_meta(model):
        if strategy != "fsdp" or sources is None:
            raise ValueError("a meta-device model is only placed by strategy 'fsdp' with its sources")
        shard_module(model, info, param_dtype)
        materialize(model, info.device, sources)
        return model
    model.to(info.device)
    if strategy == "none":
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        shard_module(model, info, param_dtype)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}; use auto, none, ddp or fsdp")


def shard_frozen(model: nn.Module, strategy: Strategy, info: DistInfo,
                 param_dtype: torch.dtype | None = None, sources: dict[str, RowSource] | None = None) -> nn.Module:
    """Freeze a model (the teacher) and place it: FSDP2-sharded per block under ``fsdp`` (gathered one block at a
    time, never whole), else replicated. A meta-device model reads its rows from ``sources`` after sharding."""
    model.requires_grad_(False).eval()
    if _is_meta(model):
        return wrap_trainable(model, strategy, info, param_dtype, sources)
    strategy = resolve_strategy(strategy, info)
    model.to(info.device)
    if strategy == "fsdp":
        shard_module(model, info, param_dtype)
    return model


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over the ranks (for logging)."""
    if not info.distributed or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(values, t.tolist())}


def whole(value: torch.Tensor) -> torch.Tensor:
    """A parameter's whole tensor: FSDP2's shards all-gathered (a collective: every rank calls it for the same
    tensor), a plain tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU (gathered from the shards under FSDP2); empty on ranks other than 0."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)
    sd = get_model_state_dict(model, options=opts)
    if not info.is_main:
        return {}
    return {k: v.detach().cpu() for k, v in sd.items()}
