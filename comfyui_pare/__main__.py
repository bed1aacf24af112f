"""Command line: ``python -m comfyui_pare {prune,inspect,compute,lora-slice} ...``.

The node pack's own tools only: the benchmarks are ``python -m benchmarks`` and token-schedule calibration is
``python -m training asymrnr-calibrate``, both in a checkout of the repository."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

from .alignment import TENSOR_CORE_MULTIPLE, align_plan, describe_alignment
from .compute import embed_head_macs, model_block_macs, sum_macs, tokens_for
from .errors import PareError
from .lora_cli import add_lora_slice_parser
from .pruned import PrunedWanMeta, describe
from .router import METADATA_KEY as ROUTER_KEY
from .router_inspect import inspect_router
from .safetensors_io import read_header
from .surgery import PrunePlan, prune_file
from .wan_reader import open_wan

logger = logging.getLogger("comfyui_pare")


def _prune(args: argparse.Namespace) -> int:
    if os.path.isdir(args.out):
        raise PareError(f"--out {args.out} is a directory; give the path of the student .safetensors file to write")
    plan = PrunePlan.load(args.plan)
    with open_wan(args.teacher) as reader:
        if any(os.path.exists(args.out) and os.path.samefile(args.out, f) for f in reader.files):
            raise PareError(f"--out {args.out} is the teacher file itself; write the student to a new file")
        if not args.no_align:
            aligned = align_plan(plan, reader.meta)
            if aligned != plan:
                logger.info("rounded the plan's widths up to multiples of %d (tensor cores; --no-align keeps them)",
                            TENSOR_CORE_MULTIPLE)
            plan = aligned
        student_meta = prune_file(reader, plan, args.out)
    summary = describe(student_meta)
    logger.info(
        "wrote %s: %.1f%% of heads, %.1f%% of FFN neurons kept",
        args.out, 100 * summary["kept_heads_fraction"], 100 * summary["kept_ffn_fraction"],
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if os.path.isfile(args.file) and ROUTER_KEY in read_header(args.file)[1]:
        report = inspect_router(args.file, args.samples, args.student, args.steps, args.shift)
        if report.get("health_summary"):
            logger.info("%s", report["health_summary"])
        json.dump(report, sys.stdout, indent=2 if args.pretty else None)
        sys.stdout.write("\n")
        return 0
    with open_wan(args.file) as reader:
        report = {**describe(reader.meta), "file": reader.describe_format(), "alignment": describe_alignment(reader.meta)}
    json.dump(report, sys.stdout, indent=2 if args.pretty else None)
    sys.stdout.write("\n")
    return 0


def _compute(args: argparse.Namespace) -> int:
    with open_wan(args.file) as reader:
        meta = reader.meta
    spec = meta.dims.spec
    tokens = tokens_for(args.frames, args.height, args.width, spec)
    student = sum_macs(model_block_macs(meta, tokens))
    teacher = sum_macs(model_block_macs(PrunedWanMeta.teacher(meta.dims), tokens))
    parts = {f.name: {"student_gmacs": getattr(student, f.name) / 1e9, "teacher_gmacs": getattr(teacher, f.name) / 1e9,
                      "ratio": getattr(student, f.name) / max(1, getattr(teacher, f.name))} for f in fields(student)}
    report = {
        "tokens": tokens, "video": [args.frames, args.height, args.width], "family": spec.title,
        "latent": list(spec.latent_shape(args.frames, args.height, args.width)),
        "per_step_block_gmacs": {"student": student.total / 1e9, "teacher": teacher.total / 1e9,
                                 "ratio": student.total / max(1, teacher.total)},
        "embed_and_head_gmacs": embed_head_macs(meta.dims, tokens) / 1e9,
        "parts": parts,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_pare", description="PARE tools for Wan checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="narrow a Wan checkpoint to the heads / FFN neurons a plan keeps")
    p.add_argument("--teacher", required=True, help="input Wan checkpoint: a .safetensors (plain, ComfyUI, diffusers, fp8_scaled or already pruned), a sharded release's .index.json, or its folder")
    p.add_argument("--plan", required=True, help='plan.json: {"blocks": [{"heads": [...], "ffn": [...]}, ...]}')
    p.add_argument("--out", required=True, help="output safetensors (written atomically)")
    p.add_argument("--no-align", action="store_true",
                   help=f"keep the plan's widths as given; by default each block's head and FFN widths are rounded "
                        f"up to multiples of {TENSOR_CORE_MULTIPLE} channels (tensor cores) by also keeping the "
                        "lowest-numbered dropped heads / neurons")
    p.set_defaults(func=_prune)
    p = sub.add_parser("inspect", help="print a checkpoint's layout, per-block widths and metadata as JSON; for a "
                                       "router file, its spec, budget calibration and health")
    p.add_argument("file", help="a Wan checkpoint in any layout (file, index or folder), or a router file")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.add_argument("--samples", default=None, help="router file: a folder of calibration samples (PARE Save "
                   "Calibration Sample) to measure its health on (live units, timestep and content sensitivity)")
    p.add_argument("--student", default=None, help="router file: the student it drives (its patch embedding makes "
                   "the latent tokens a router with latent input reads)")
    p.add_argument("--steps", type=int, default=10, help="router file: steps of the schedule to probe (default 10)")
    p.add_argument("--shift", type=float, default=5.0, help="router file: flow shift of that schedule (default 5)")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("compute", help="per-step block compute (MACs per part) of a checkpoint vs its teacher")
    p.add_argument("file", help="a Wan checkpoint in any layout (file, index or folder)")
    p.add_argument("--frames", type=int, default=81, help="video frames (default 81; the 5B's native is 121)")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (default 480); the file's family "
                   "gives the VAE stride (8 for Wan2.1, 16 for the Wan2.2 5B VAE)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (default 832)")
    p.set_defaults(func=_compute)
    add_lora_slice_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # CLI entry point only, never on import
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
