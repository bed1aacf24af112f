"""The bench verb: pick a profile and suites, run them, print the tables, write ``bench.json`` and ``bench.png``."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from comfyui_pare.safetensors_io import atomic_write_text

from . import SUITES
from .config import BenchConfig, MeasuredShape, profile

logger = logging.getLogger(__name__)
SCHEMA = "pare-bench/1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfyui_pare bench",
                                description="PARE benchmarks: analytic compute at real Wan2.1 shapes and step time "
                                            "through ComfyUI's own sampler (see docs/benchmarks.md).")
    p.add_argument("--quick", action="store_true", help="seconds: a narrow model, 2 rounds, no compile suite")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: Wan2.1-1.3B width at full depth, 81 frames at 480x832 (needs a GPU)")
    p.add_argument("--suite", default=None,
                   help=f"comma-separated suites to run, from {', '.join(SUITES)} (default: the profile's)")
    p.add_argument("--out", default="bench-output", help="folder for bench.json and bench.png (default bench-output)")
    p.add_argument("--repeats", type=int, help="counted interleaved rounds")
    p.add_argument("--steps", type=int, help="sampler steps per run")
    p.add_argument("--blocks", type=int, help="transformer blocks of the measured models")
    p.add_argument("--latent", help="latent frames,height,width (latent pixels; tokens = f * h/2 * w/2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile-backend", help="torch.compile backend of the compile suite (default inductor)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = profile("cuda" if args.device == "cuda" else "quick" if args.quick else "default")
    if args.device == "cuda" and args.quick:
        config = replace(config, repeats=2, quick=True)
    changes: dict = {}
    if args.suite:
        suites = tuple(s.strip() for s in args.suite.split(",") if s.strip())
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise SystemExit(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
        changes["suites"] = suites
    if args.repeats:
        changes["repeats"] = args.repeats
    if args.blocks:
        changes["dims"] = replace(config.dims, num_layers=args.blocks)
    shape = config.shape
    if args.steps:
        shape = replace(shape, steps=args.steps)
    if args.latent:
        try:
            latent = tuple(int(v) for v in args.latent.split(","))
        except ValueError:
            latent = ()
        if len(latent) != 3 or min(latent) < 1:
            raise SystemExit(f"--latent must be three positive integers frames,height,width; got {args.latent!r}")
        shape = replace(shape, latent=latent)
    if shape != config.shape:
        changes["shape"] = MeasuredShape(**{**shape.__dict__})
    if args.threads:
        changes["threads"] = args.threads
    if args.compile_backend:
        changes["compile_backend"] = args.compile_backend
    return replace(config, **changes)


def environment(config: BenchConfig) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name() if config.device == "cuda" and torch.cuda.is_available() else None}


def run(config: BenchConfig, out: Path) -> dict:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if config.threads:
        torch.set_num_threads(config.threads)
    result = {"schema": SCHEMA, "config": config.to_json(), "environment": environment(config), "suites": {},
              "seconds": {}}
    lines: list[str] = []
    for name in config.suites:
        module = SUITES[name].load()
        start = time.perf_counter()

        def progress(done: int, total: int, name=name) -> None:
            logger.info("bench %s: round %d/%d", name, done, total)

        logger.info("bench: running suite %s", name)
        result["suites"][name] = module.run(config, progress)
        result["seconds"][name] = time.perf_counter() - start
        lines += ["", *module.table(result["suites"][name])]
    result["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=1))
    from .chart import chart

    image = chart(result)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    (out / "bench.png.tmp").write_bytes(buf.getvalue())
    os.replace(out / "bench.png.tmp", out / "bench.png")
    sys.stdout.write("\n".join(lines) + f"\n\nwrote {out / 'bench.json'} and {out / 'bench.png'}\n")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(config_from_args(args), Path(args.out))
    return 0
