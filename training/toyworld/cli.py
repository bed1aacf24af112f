"""``python -m training toyworld rebuild --out DIR``: rebuild the toy world (see ``training/toyworld/rebuild.py``);
``python -m training toyworld head-ablation --stats STATS``: which teacher heads carry the motion
(``training/toyworld/head_ablation.py``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from comfyui_pare.safetensors_io import load_tensors
from comfyui_pare.toy_text import ToyTextEncoder

from ..calibrate import CalibrationStats
from ..model import WanTransformer
from .comfy_vae import load_vae
from .head_ablation import ablate_heads, write_report
from .rebuild import STAGES, RebuildConfig, rebuild
from .teacher import SHIFT

HELP = "build the toy world (generator, VAE, text encoder, teacher, PARE student), resumably"
WEIGHTS = Path(__file__).resolve().parent / "weights"
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
    a = sub.add_parser("head-ablation", help="ablate each teacher head alone; trajectory error rise vs head type")
    a.add_argument("--stats", type=Path, required=True,
                   help="`calibrate`'s stats file for this teacher (the rebuild writes OUT/pare/stats.safetensors)")
    a.add_argument("--weights", type=Path, default=WEIGHTS, help="folder with the toy teacher, text encoder and VAE")
    a.add_argument("--out", type=Path, default=Path("docs/toy_head_ablation.json"), help="report (.json; .png beside)")
    a.add_argument("--seed", type=int, default=0, help="first sampling seed (one per prompt)")
    a.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    if args.toy_cmd == "head-ablation":
        return run_head_ablation(args)

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


def run_head_ablation(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    stats = CalibrationStats.load(args.stats)
    teacher = WanTransformer.from_checkpoint(args.weights / "pare_toy_teacher.safetensors", dtype=torch.float32)
    if tuple(stats.head_importance.shape) != (teacher.meta.dims.num_layers, teacher.meta.dims.num_heads):
        raise ValueError(f"{args.stats}: head stats of shape {tuple(stats.head_importance.shape)} do not describe "
                         f"the teacher's {teacher.meta.dims.num_layers} blocks x {teacher.meta.dims.num_heads} heads")
    text = ToyTextEncoder.load(args.weights / "pare_toy_text.safetensors")
    vae = load_vae(load_tensors(args.weights / "pare_toy_vae.safetensors")[0])
    result = ablate_heads(teacher, text, vae, SHIFT, args.seed)
    report = write_report(args.out, result, stats.head_ratio, stats.head_type(), stats.head_importance)
    logging.getLogger(__name__).info("wrote %s: spearman %s, within-block pairs %s", args.out, report["spearman"],
                                     report["within_block_pairs_ordered_like_damage"])
    return 0
