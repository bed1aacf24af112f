"""Resumable training state: ``checkpoint-<step>/`` folders as in diffusers' training examples.

A checkpoint folder holds

* ``model/``: the trainable module's state, written with ``torch.distributed.checkpoint`` through its
  safetensors storage (``HuggingFaceStorageWriter``): every rank writes its own shard under FSDP2, and the
  reader re-assembles any layout; nothing is pickled;
* ``optimizer/``: the optimizer's per-parameter tensors the same way, keyed by parameter name
  (``get_optimizer_state_dict``), and ``optimizer.json`` for its hyper-parameters;
* ``<name>/`` for each extra named state (the EMA of the weights: ``ema/``), the same way, so it reshards too;
* ``rng.safetensors``: the training generator's state (every rank holds the same one) and torch's global state;
* ``trainer_state.json``: the step and the caller's extra state; ``config.toml``: the resolved config.

Each rank writes its safetensors file one tensor at a time (``StreamingStorageWriter``), so a checkpoint costs no
memory beyond the one tensor being written. It is written to ``.checkpoint-<step>.tmp`` and renamed into place by rank 0 when every rank is done, so a killed
run never leaves a partial ``checkpoint-<step>``; ``--resume latest`` picks the highest complete step. Older
folders beyond ``total_limit`` are removed after each save. Every tensor goes through ``torch.distributed.checkpoint``
keyed by parameter name, so a checkpoint written on N ranks resumes on M (FSDP2 shards or one process).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    _gen_file_name,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from comfyui_pare.safetensors_io import StreamingWriter, atomic_write_text, load_tensors, save_atomic

from .config import save_config
from .parallel import DistInfo, barrier

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")
_SEP = "::"  # joins parameter FQN and optimizer state name; never appears in a module path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or for another model)."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``None`` -> start fresh; ``latest`` -> the newest checkpoint (or fresh if none); else a folder path or name."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("--resume latest: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        return found[-1][1]
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint folder (no trainer_state.json); "
                              f"use --resume latest or one of {[p.name for _, p in list_checkpoints(output_dir)]}")
    return path


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for fqn, state in osd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}{_SEP}{name}"] = value
            else:
                scalars[f"{fqn}{_SEP}{name}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        fqn, name = key.split(_SEP)
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class StreamingStorageWriter(HuggingFaceStorageWriter):
    """DCP's safetensors storage, each rank's file written one tensor at a time.

    ``HuggingFaceStorageWriter`` assembles a rank's whole file in memory before writing it: every tensor is cloned
    out of FSDP2's padded shard storage, and ``safetensors.torch.save`` serializes them all into one bytes object
    (through a bytes copy of each): two to three times the rank's state at every checkpoint, which is what peaked
    at the checkpoint in issue 32 (+2 GB per rank over training on 2 ranks; in one process the optimizer state x2
    next to the teacher). This writes the same file (DCP's header metadata, the same tensor names, shapes and
    offsets; ``HuggingFaceStorageReader`` reads it) through ``StreamingWriter``: the header first, then each tensor's
    bytes straight from the state (a device tensor is copied to the host one at a time)."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        if plan.items:
            if any(item.type == WriteItemType.BYTE_IO for item in plan.items):
                raise CheckpointError(f"{self.path}: only tensors are checkpointed; a non-tensor entry reached DCP")
            name = _gen_file_name(1, 1, plan.storage_data.get("shard_index"))
            items = {item.index.fqn: item for item in plan.items}
            specs = {fqn: (item.tensor_data.properties.dtype, tuple(item.tensor_data.chunk.sizes))
                     for fqn, item in items.items()}
            offsets = {fqn: {"saved_offsets": list(item.tensor_data.chunk.offsets)} for fqn, item in items.items()}
            metadata = {CUSTOM_METADATA_KEY: json.dumps(offsets), DCP_VERSION_KEY: str(HF_DCP_VERSION),
                        FORMAT_KEY: FORMAT_VALUE}
            with StreamingWriter(Path(self.path) / name, specs, metadata) as writer:
                for fqn in writer.order:
                    tensor = planner.resolve_data(items[fqn]).detach()
                    writer.write(fqn, tensor)
                    length = tensor.numel() * tensor.element_size()
                    results.append(WriteResult(index=items[fqn].index, size_in_bytes=length,
                                               storage_data=_StorageInfo(name, 0, length)))
        done: Future = Future()
        done.set_result(results)
        return done


def _writer(path: Path, info: DistInfo) -> HuggingFaceStorageWriter:
    return StreamingStorageWriter(str(path), save_distributed=info.distributed)


@dataclass
class TrainingState:
    """What a checkpoint restores besides the weights."""

    step: int = 0
    extra: dict = field(default_factory=dict)


def load_model_weights(path: str | os.PathLike, model: nn.Module, distributed: bool = False) -> None:
    """Load only the model state of checkpoint folder ``path`` into ``model`` (e.g. to export a trained run)."""
    path = Path(path)
    msd = get_model_state_dict(model)
    try:
        dcp.load(msd, storage_reader=HuggingFaceStorageReader(str(path / "model")), no_dist=not distributed)
    except Exception as e:  # DCP raises several types; name the folder and the likely cause
        raise CheckpointError(f"{path}/model: cannot load into this model ({type(e).__name__}: {e}); "
                              "was it written for another student?") from e
    set_model_state_dict(model, msd)


class CheckpointManager:
    """Save and restore (model, optimizer, generators, step) of one run in ``output_dir``."""

    def __init__(self, output_dir: str | os.PathLike, info: DistInfo, total_limit: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.info = info
        self.total_limit = total_limit

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             generators: dict[str, torch.Generator], config: Any = None, extra: dict | None = None,
             named_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write a checkpoint of ``step``. ``named_states``: more name -> tensor states (e.g. the EMA weights by
        parameter name, sharded like the parameters), each in its own folder."""
        final = self.output_dir / f"{PREFIX}{step}"
        tmp = self.output_dir / f".{PREFIX}{step}.tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        nd = not self.info.distributed
        dcp.save(get_model_state_dict(model), storage_writer=_writer(tmp / "model", self.info), no_dist=nd)
        optim_tensors, optim_meta = _flatten_optim(get_optimizer_state_dict(model, optimizer))
        dcp.save(optim_tensors, storage_writer=_writer(tmp / "optimizer", self.info), no_dist=nd)
        for name, tensors in (named_states or {}).items():
            dcp.save(dict(tensors), storage_writer=_writer(tmp / name, self.info), no_dist=nd)
        barrier()
        if self.info.is_main:
            atomic_write_text(tmp / "optimizer.json", json.dumps(optim_meta, indent=1, default=list))
            rng = {f"generator.{k}": g.get_state() for k, g in generators.items()}
            rng["torch_global"] = torch.get_rng_state()
            save_atomic(tmp / "rng.safetensors", rng, {"format": "pt"})
            if config is not None:
                save_config(config, tmp / "config.toml")
            atomic_write_text(tmp / "trainer_state.json", json.dumps({"step": step, "extra": extra or {}}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
            logger.info("saved %s", final)
        barrier()
        return final

    def _prune(self) -> None:
        if self.total_limit <= 0:
            return
        found = list_checkpoints(self.output_dir)
        for _, path in found[:-self.total_limit]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s (checkpoints_total_limit %d)", path, self.total_limit)

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
             generators: dict[str, torch.Generator],
             named_states: dict[str, dict[str, torch.Tensor]] | None = None) -> TrainingState:
        """Restore everything ``save`` wrote into the given (already wrapped) model and optimizer, and each of
        ``named_states`` in place (its tensors are filled, in this run's sharding)."""
        path = Path(path)
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            optim_meta = json.loads((path / "optimizer.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: incomplete or corrupt checkpoint ({e})") from e
        nd = not self.info.distributed
        load_model_weights(path, model, distributed=self.info.distributed)
        optim_tensors, _ = _flatten_optim(get_optimizer_state_dict(model, optimizer))
        dcp.load(optim_tensors, storage_reader=HuggingFaceStorageReader(str(path / "optimizer")), no_dist=nd)
        set_optimizer_state_dict(model, optimizer, _unflatten_optim(optim_tensors, optim_meta))
        rng, _ = load_tensors(path / "rng.safetensors")
        for name, gen in generators.items():
            key = f"generator.{name}"
            if key not in rng:
                raise CheckpointError(f"{path}/rng.safetensors: no state for generator '{name}'")
            gen.set_state(rng[key])
        torch.set_rng_state(rng["torch_global"])
        for name, tensors in (named_states or {}).items():
            if not (path / name).is_dir():
                raise CheckpointError(f"{path}: the checkpoint has no '{name}' state (it was written without it)")
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / name)), no_dist=nd)
        logger.info("resumed from %s (step %d)", path, state["step"])
        return TrainingState(step=int(state["step"]), extra=state.get("extra", {}))
