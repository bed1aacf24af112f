"""Host memory of every phase of a ``distill`` or ``route`` run, sharded (torchrun, gloo, FSDP2) and in one process,
at the proportions of a real teacher (issue 32's measurement).

    python -m scripts.bench_training_memory --work /tmp/mem --ranks 2 --stage distill   # from the repository root
    python -m scripts.bench_training_memory --work /tmp/mem --ranks 1 --teacher-dtype bfloat16

Defaults: Wan2.1-1.3B width (dim 1536, 12 heads, FFN 8960, text dim 4096), 32 blocks, a float32 teacher file
(6.05 GB); a student keeping 1 head and 16 FFN neurons of ``--student-blocks`` blocks (depth-pruned; 0 keeps all
32, the issue's student); 4 calibration samples; 2 steps of batch 2, a checkpoint, EMA, ``eval_samples = 2``; one
torch thread per rank, ``nice -n 10``, ``MALLOC_MMAP_THRESHOLD_=131072`` (resident memory shows what the program
holds, not what glibc caches). It prints, per phase, every rank's exact peak (``resources.json``, ``VmHWM``) and
the largest of the resident-set samples taken twice a second from outside (``training.memory_probe``), the bounds
of issue 32 and the teacher's load throughput, and writes them to ``<work>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from comfyui_pare.calibration import write_sample
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import BlockWidth, WanDims
from training.memory_probe import run_watched, sampled_phase_peaks
from training.resources import PHASES
from training.tiny import write_random_wan

REPO = Path(__file__).resolve().parents[1]

GIB = 1 << 30
LATENT = [16, 1, 4, 4]


def build(work: Path, args) -> dict:
    """Teacher, student and samples under ``work`` (kept between runs: building a 6 GB teacher takes minutes)."""
    dims = WanDims(dim=args.dim, num_heads=args.heads, ffn_dim=args.ffn, num_layers=args.blocks, text_dim=args.text_dim)
    tag = f"{args.dim}x{args.blocks}-{args.file_dtype}"
    teacher = work / f"teacher-{tag}.safetensors"
    kept = tuple(range(args.blocks)) if not args.student_blocks else tuple(
        round(i * (args.blocks - 1) / max(1, args.student_blocks - 1)) for i in range(args.student_blocks))
    smeta = PrunedWanMeta(dims, (BlockWidth(tuple(range(args.student_heads)), tuple(range(args.student_ffn))),) *
                          len(kept), kept_blocks=None if len(kept) == args.blocks else kept)
    student = work / f"student-{tag}-{len(kept)}.safetensors"
    tmeta = PrunedWanMeta.teacher(dims)
    if not teacher.is_file():
        write_random_wan(teacher, tmeta, seed=0, dtype=getattr(torch, args.file_dtype))
    if not student.is_file():
        write_random_wan(student, smeta, seed=1)
    samples = work / f"samples-{args.text_dim}"
    if not samples.is_dir():
        samples.mkdir(parents=True)
        gen = torch.Generator().manual_seed(0)
        for i in range(4):
            write_sample(samples / f"s{i}.safetensors", torch.randn(8, args.text_dim, generator=gen),
                         latent_shape=LATENT, seed=i, prompt=f"p{i}", latent=torch.randn(LATENT, generator=gen))
    count = lambda meta: sum(math.prod(s) for s in meta.expected_shapes().values())  # noqa: E731
    bytes_per = 2 if args.teacher_dtype == "bfloat16" else 4
    return {"teacher": teacher, "student": student, "samples": samples, "teacher_bytes": count(tmeta) * bytes_per,
            "block_bytes": count(tmeta) * bytes_per // args.blocks, "student_bytes": count(smeta) * 4}


def drop_cache(path: Path) -> None:
    """Evict this file's pages from the page cache (only this file's), so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read_speed(path: Path, cold: bool) -> float:
    """Bytes/s of reading the whole file in 64 MiB reads: what the disk (cold) or the page cache gives one reader."""
    if cold:
        drop_cache(path)
    buf = bytearray(64 << 20)
    began, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (time.perf_counter() - began)


def config(work: Path, files: dict, args, out: Path) -> Path:
    table = ("[distill]\neval_samples = 2\n" if args.stage == "distill" else
             '[route]\nbudget = 0.5\nhidden = 32\npin_first = 0\nfixed_schedule = "0-0"\neval_samples = 2\n'
             "eval_sigmas = 1\n")  # a fixed skip: 2 steps cannot train a router that passes the health check
    path = out.with_suffix(".toml")
    path.write_text(f"""[model]
teacher = "{files['teacher']}"
student = "{files['student']}"
teacher_dtype = "{args.teacher_dtype}"
[data]
samples = "{files['samples']}"
[train]
output_dir = "{out}"
steps = 2
batch_size = 2
learning_rate = 1e-4
checkpointing_steps = 2
ema_decay = 0.9
device = "cpu"
strategy = "{'fsdp' if args.ranks > 1 else 'none'}"
{table}""")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stage", choices=["distill", "route"], default="distill")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--file-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--student-blocks", type=int, default=0, help="depth-pruned student (0: every block)")
    p.add_argument("--student-heads", type=int, default=1)
    p.add_argument("--student-ffn", type=int, default=16)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--cold", action="store_true", help="evict the teacher file from the page cache before reading")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = build(args.work, args)
    name = f"{args.stage}-{args.ranks}r-{args.dim}x{args.blocks}-{args.teacher_dtype}-s{args.student_blocks}"
    out = args.work / name
    cfg = config(args.work, files, args, out)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks)]
              if args.ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(REPO)}
    raw = sequential_read_speed(files["teacher"], args.cold)
    if args.cold:
        drop_cache(files["teacher"])
    run = run_watched(["nice", "-n", "10", *launch, "-m", "training", args.stage, "--config", str(cfg)], REPO, env,
                      args.timeout)
    if run.returncode != 0:
        print(run.stderr[-6000:], file=sys.stderr)
        return 1
    report = json.loads((out / "resources.json").read_text())
    sampled = sampled_phase_peaks(run.samples, report)
    t, blk, s = files["teacher_bytes"], files["block_bytes"], files["student_bytes"]
    base = report["host_baseline_bytes"]
    ranks = args.ranks
    bound = [t / ranks + b + 4 * blk + GIB // 2 for b in base] if ranks > 1 else [t + 3 * s + GIB]
    rows = ["| phase | peak per rank (GiB, VmHWM) | sampled max per rank (GiB) |", "|---|---|---|"]
    for phase in PHASES:
        peaks = report["phase_peak_bytes"][phase]
        if any(peaks):
            rows.append(f"| {phase} | {', '.join(f'{v / GIB:.2f}' for v in peaks)} | "
                        f"{', '.join(f'{v / GIB:.2f}' for v in sampled.get(phase, [0] * ranks))} |")
    load = report["teacher_load"]
    summary = {"name": name, "teacher_gib": t / GIB, "block_gib": blk / GIB, "student_gib": s / GIB,
               "baseline_gib": [b / GIB for b in base], "peak_gib": [v / GIB for v in report["host_peak_bytes"]],
               "bound_gib": [v / GIB for v in bound], "holds": all(v < b for v, b in zip(report["host_peak_bytes"],
                                                                                   bound)),
               "load_bytes_per_s": load["bytes_per_s"], "load_seconds": load["seconds"],
               "load_read_seconds": load["read_seconds"], "load_bytes": load["bytes"], "sequential_read_bytes_per_s": raw,
               "phase_peak_gib": {k: [v / GIB for v in vs] for k, vs in report["phase_peak_bytes"].items()},
               "sampled_gib": {k: [v / GIB for v in vs] for k, vs in sampled.items()},
               "phase_starts": report["phase_starts"]}
    (args.work / f"{name}.json").write_text(json.dumps(summary, indent=1))
    print(f"{name}: teacher {t / GIB:.2f} GiB, block {blk / GIB:.3f} GiB, student {s / GIB:.3f} GiB, baseline "
          f"{[round(b / GIB, 2) for b in base]} GiB")
    print("\n".join(rows))
    print(f"whole-run peak {[round(v / GIB, 2) for v in report['host_peak_bytes']]} GiB, bound "
          f"{[round(v / GIB, 2) for v in bound]} GiB: {'holds' if summary['holds'] else 'DOES NOT HOLD'}")
    print(f"teacher load: {[round(v / 1e6) for v in load['bytes']]} MB per rank in {[round(v, 1) for v in load['seconds']]}"
          f" s ({[round(v / 1e6) for v in load['bytes_per_s']]} MB/s), of which reading "
          f"{[round(v, 1) for v in load['read_seconds']]} s; one sequential reader of the whole file "
          f"({'cold' if args.cold else 'page cache'}): {raw / 1e6:.0f} MB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
