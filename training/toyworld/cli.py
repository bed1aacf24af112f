"""``python -m training toyworld rebuild --out DIR``: rebuild the toy world (see ``training/toyworld/rebuild.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build the toy world (generator, VAE, text encoder, teacher, PARE student), resumably"
STAGE_NAMES = ("latents", "teacher", "vae", "evaluate", "pare", "ship")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_cmd", required=True, metavar="CMD")
    r = sub.add_parser("rebuild", help="rebuild every toy asset, resuming after a kill")
    r.add_argument("--out", type=Path, required=True, help="work folder (stage stamps, checkpoints, outputs)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (the box is shared)")
    r.add_argument("--stages", nargs="*", default=[], help=f"only these stages, of {', '.join(STAGE_NAMES)}")
    r.add_argument("--teacher-steps", type=int, default=None,
                   help="teacher training steps (default 8000, the shipped teacher)")
    r.add_argument("--teacher-batch", type=int, default=None, help="teacher batch size (default 16)")
    r.add_argument("--teacher-object-weight", type=float, default=None,
                   help="extra flow-matching loss weight on the cells objects cover (default 9)")


def run(args: argparse.Namespace) -> int:
    from .rebuild import STAGES, RebuildConfig, rebuild

    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    for name in ("teacher_steps", "teacher_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.teacher_object_weight is not None and args.teacher_object_weight < 0:
        raise ValueError(f"--teacher-object-weight must be >= 0, got {args.teacher_object_weight}")
    rebuild(RebuildConfig(out=args.out, device=args.device, threads=args.threads, stages=args.stages,
                          teacher_steps=args.teacher_steps, teacher_batch=args.teacher_batch,
                          teacher_object_weight=args.teacher_object_weight))
    return 0
