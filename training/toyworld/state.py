"""Resumable training state for the toy world's trainers, in safetensors only (no pickle).

One file per trainer: the model's tensors (``model.*``), Adam's moments (``opt.<param index>.<name>``), and in the
metadata the step and the optimizer's scalar state. Written atomically, so a kill at any moment leaves either the
previous or the new state on disk, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from comfyui_pare.safetensors_io import load_tensors, save_atomic

logger = logging.getLogger(__name__)


def save_state(path: str | os.PathLike, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               step: int, extra: dict | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
    scalars: dict[str, dict] = {}
    for k, st in optimizer.state_dict()["state"].items():
        for sk, sv in st.items():
            if torch.is_tensor(sv) and sv.ndim > 0:
                tensors[f"opt.{k}.{sk}"] = sv.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(k), {})[sk] = float(sv)
    meta = {"step": str(step), "opt_scalars": json.dumps(scalars), "extra": json.dumps(extra or {})}
    save_atomic(path, tensors, meta)


def load_state(path: str | os.PathLike, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore modules and optimizer from ``save_state``'s file; returns (step, extra)."""
    tensors, meta = load_tensors(path)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    opt_sd = optimizer.state_dict()
    scalars = json.loads(meta["opt_scalars"])
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in scalars.items():
        state.setdefault(int(idx), {}).update({k: torch.tensor(v) for k, v in sc.items()})
    opt_sd["state"] = state
    optimizer.load_state_dict(opt_sd)
    logger.info("resumed %s at step %s", Path(path).name, meta["step"])
    return int(meta["step"]), json.loads(meta["extra"])
