"""The bench verb: pick a profile and suites, run them, print the tables, write ``bench.json`` and ``bench.png``."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from comfyui_pare.safetensors_io import atomic_write_text

from . import SUITES
from .config import MODELS, RESOLUTIONS, BenchConfig, MeasuredShape, profile

logger = logging.getLogger(__name__)
SCHEMA = "pare-bench/1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="PARE benchmarks: analytic compute at real Wan2.1 shapes and step time "
                                            "through ComfyUI's own sampler (see docs/benchmarks.md).")
    p.add_argument("--quick", action="store_true", help="seconds: a narrow model, 2 rounds, no compile suite")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: Wan2.1-1.3B width at full depth (or --model 14b), 81 frames at 480x832 (needs a GPU); "
                        "with --quick, a few blocks and 2 rounds (under 2 minutes, file creation included)")
    p.add_argument("--model", choices=MODELS, default="1.3b",
                   help="width of the measured models: 1.3b (dim 1536) or 14b (dim 5120, 40 heads, FFN 13824; 8 "
                        "blocks on a GPU, sized for a 24 GB card)")
    p.add_argument("--resolution", choices=tuple(RESOLUTIONS), default="480p",
                   help="GPU token count: 81 frames at 480p (32,760 tokens) or 720p (75,600)")
    p.add_argument("--fp8", choices=("auto", "on", "off"), default="auto",
                   help="fp8 rows (fp8_e4m3fn_fast and an fp8_scaled student); auto: on CUDA GPUs with fp8 matmuls "
                        "(compute capability 8.9+)")
    p.add_argument("--weights-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the bench checkpoints (default: float32 on the CPU, bfloat16 on a GPU)")
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
    if args.device == "cuda":
        name = "cuda-quick" if args.quick else "cuda"
    else:
        name = "quick" if args.quick else "default"
    if args.quick and args.device == "cpu" and args.model != "1.3b":
        raise SystemExit("--quick on the CPU uses a narrow stand-in model; --model applies to the default and cuda runs")
    config = profile(name, args.model, args.resolution)
    changes: dict = {"fp8": {"auto": None, "on": True, "off": False}[args.fp8]}
    if args.weights_dtype:
        changes["weights_dtype"] = args.weights_dtype
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


def comfyui_version() -> str | None:
    """The version of the ComfyUI tree the measured suites import (its ``comfyui_version.py``), without importing it."""
    from comfy_library import COMFY_DIR

    try:
        text = (COMFY_DIR / "comfyui_version.py").read_text()
    except OSError:
        return None
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return found[1] if found else None


def environment(config: BenchConfig) -> dict:
    gpu = config.device == "cuda" and torch.cuda.is_available()
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name() if gpu else None,
            "cuda_version": torch.version.cuda if gpu else None,
            "compute_capability": list(torch.cuda.get_device_capability()) if gpu else None,
            "comfyui": comfyui_version()}


def environment_line(env: dict) -> str:
    """The line a table of results is quoted with: the card (or CPU), torch, CUDA and ComfyUI versions."""
    where = f"{env['cuda']} (CUDA {env['cuda_version']})" if env.get("cuda") else f"CPU ({env['cpu_count']} cores)"
    return f"{where}, torch {env['torch']}, ComfyUI {env.get('comfyui') or 'unknown'}"


def run(config: BenchConfig, out: Path) -> dict:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if config.threads:
        torch.set_num_threads(config.threads)
    result = {"schema": SCHEMA, "config": config.to_json(), "environment": environment(config), "suites": {},
              "seconds": {}}
    lines: list[str] = [environment_line(result["environment"])]
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
