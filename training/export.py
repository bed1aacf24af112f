"""The two files the nodes load: the student (pruned-checkpoint format) and its router (router format).

The router is bound to the student it was trained with: its ``model_fingerprint`` is the student's
``PrunedWanMeta.fingerprint()``, so ``PAREApplyRouter`` warns when it is put on another model. Both files are
written atomically and read back through the same validators the nodes use before this returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from comfyui_pare.errors import PareFormatError
from comfyui_pare.pruned import load_checkpoint, save_checkpoint
from comfyui_pare.router import BlockRouter, read_router_spec, save_router

from . import route, route_eval  # modules, not names: route -> route_eval -> export is a cycle
from .checkpointing import CheckpointError, load_model_weights, resolve_resume
from .config import load_config
from .model import WanTransformer

logger = logging.getLogger(__name__)


def export_student_and_router(student: WanTransformer, router: BlockRouter, student_out: str | os.PathLike,
                              router_out: str | os.PathLike, default_threshold: float,
                              train_budget: float | None, dtype: torch.dtype = torch.float32) -> None:
    """Write ``student`` (weights in ``dtype``) and ``router`` (float32) with the router's trained defaults."""
    meta = student.meta
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in student.state_dict().items()}
    save_checkpoint(student_out, sd, meta)
    spec = dataclasses.replace(router.spec, model_fingerprint=meta.fingerprint(),
                               default_threshold=float(default_threshold), train_budget=train_budget)
    out = BlockRouter(spec)
    out.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in router.state_dict().items()})
    save_router(router_out, out)
    # Read both back as the nodes will, so a file that would not load is never left as the result.
    _, written = load_checkpoint(student_out)
    written_spec = read_router_spec(router_out)
    if written_spec.model_fingerprint != written.fingerprint():
        raise PareFormatError(f"{router_out}: router fingerprint {written_spec.model_fingerprint} does not match "
                              f"{student_out} ({written.fingerprint()})")
    logger.info("exported student %s (fingerprint %s) and router %s (default threshold %.4g, budget %s)",
                student_out, written.fingerprint(), router_out, default_threshold, train_budget)


# ---------------------------------------------------------------------------------------------- the verb

HELP = "write a stage-2 run's student (pruned format) and router (router format), the two files the nodes load"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="run_dir", required=True, help="the route run's output folder (train.output_dir)")
    p.add_argument("--checkpoint", default="latest", help="'latest' (default) or a checkpoint folder name or path")
    p.add_argument("--student-out", required=True, help="where to write the student (.safetensors; the nodes read it "
                                                        "from models/diffusion_models)")
    p.add_argument("--router-out", required=True, help="where to write the router (.safetensors; the nodes read it "
                                                       "from models/pare_routers)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="override train.device for the export")


def export_checkpoint(checkpoint: str | os.PathLike, student_out: str | os.PathLike, router_out: str | os.PathLike,
                      device: str | None = None) -> dict:
    """Rebuild a route run from a checkpoint's saved config, load its weights, calibrate the router's default
    threshold on the held-out inputs and write both files (as ``route`` does at its end). Returns the report."""
    checkpoint = Path(checkpoint)
    cfg = load_config(route.RouteConfig, checkpoint / "config.toml")
    train = dataclasses.replace(cfg.train, strategy="none", **({"device": device} if device else {}))
    cfg = dataclasses.replace(cfg, train=train)
    _, stage = route.build(cfg)
    load_model_weights(checkpoint, stage.gated)
    return route_eval.finish_run(cfg, stage, stage.gated.state_dict(), Path(student_out), Path(router_out))


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CheckpointError("export runs as one process; start it without torchrun")
    path = resolve_resume(args.run_dir, args.checkpoint)
    if path is None:
        raise CheckpointError(f"{args.run_dir}: no checkpoint-<step> folder to export")
    report = export_checkpoint(path, args.student_out, args.router_out, args.device)
    logger.info("exported %s: %s", path, json.dumps(report))
    return 0
