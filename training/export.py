"""``python -m training export``: rebuild a stage-2 run from one of its checkpoints and finish it as ``route`` does at
its end (``route_finish``): the two files the nodes load, the student (pruned-checkpoint format) and its router
(router format), with the router's default threshold and budget calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from .checkpointing import CheckpointError, load_model_weights, resolve_resume
from .config import load_config
from .route import RouteConfig, build
from .route_finish import finish_run

logger = logging.getLogger(__name__)


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
    cfg = load_config(RouteConfig, checkpoint / "config.toml")
    train = dataclasses.replace(cfg.train, strategy="none", **({"device": device} if device else {}))
    cfg = dataclasses.replace(cfg, train=train)
    _, stage = build(cfg)
    load_model_weights(checkpoint, stage.gated)
    return finish_run(cfg, stage, stage.gated.state_dict(), Path(student_out), Path(router_out))


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CheckpointError("export runs as one process; start it without torchrun")
    path = resolve_resume(args.run_dir, args.checkpoint)
    if path is None:
        raise CheckpointError(f"{args.run_dir}: no checkpoint-<step> folder to export")
    report = export_checkpoint(path, args.student_out, args.router_out, args.device)
    logger.info("exported %s: %s", path, json.dumps(report))
    return 0
