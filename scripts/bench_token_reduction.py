"""Token reduction at Wan2.1 1.3B width: compute and wall time over reduction ratios, alone and on a PARE student.

Usage: ``python -m scripts.bench_token_reduction [--grid 5,20,34] [--reps 5] [--threads 1] [--out result.json]``

Two measurements, printed as tables and written as JSON:

* **Compute** (analytic, ``comfyui_pare.compute`` + ``token_reduction.reduced_attention_macs``): per-step block
  MACs of the whole model at 81 frames 480x832 (32,760 tokens), for the teacher, a PARE student (half the heads
  and FFN neurons of every block), and that student routed at a 75% block budget, each at every ratio.
* **Wall time** (measured): the self-attention of a 1.3B-width block alone (q, k, v -> output, with matching,
  reduction and restoration; 12 heads of 128, or the student's 6), matching every step or reused (cached); and the
  whole block (dim 1536, FFN 8960, or the student's 6 heads and 4480 neurons) through ``training.token_reduction``
  (the node's math on the trainable Wan; SDPA as the attention function) with the matching reused. Every
  repetition runs all configurations in turn (interleaved with the baseline), after one warm-up round that is not
  counted; min and median over the repetitions.

The grid default (13 frames at 256x448) keeps a CPU run to minutes; at real sizes attention's share, and so the
saving, is larger (the compute table shows it at 480p).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from comfyui_pare.compute import model_block_macs, sum_macs, tokens_for
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.surgery import BlockPlan, PrunePlan, plan_selections, prune_state_dict
from comfyui_pare.token_reduction import (
    Reduction,
    plan_matching,
    reduced_attention,
    reduced_attention_macs,
    sdpa_attend,
)
from comfyui_pare.token_schedule import ReductionRule, TokenSchedule
from comfyui_pare.wan import WAN21_1_3B
from training.model import WanTransformer, rope_freqs
from training.tiny import random_wan_state_dict
from training.token_reduction import TokenReduction

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench_token_reduction")
RATIOS = [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (0.7, 0.7), (0.5, 0.25), (0.7, 0.0)]  # (q, kv)
STRIDE = (1, 2, 2)
REAL_GRID = (21, 30, 52)  # 81 frames at 480x832
ROUTED_BUDGET = 0.75


def half_width(meta: PrunedWanMeta) -> PrunePlan:
    """Half of every block's heads and FFN neurons: a typical PARE student's width."""
    d = meta.dims
    return PrunePlan(tuple(BlockPlan(heads=tuple(range(d.num_heads // 2)), ffn=tuple(range(d.ffn_dim // 2)))
                           for _ in meta.blocks))


def student_meta(dims) -> PrunedWanMeta:
    teacher = PrunedWanMeta.teacher(dims)
    return plan_selections(teacher, half_width(teacher))[1]


def compute_table() -> list[dict]:
    """Per-step block GMACs at 480p, 81 frames, for each model and ratio."""
    tokens = tokens_for(81, 480, 832)
    rows = []
    for label, meta, budget in (("teacher", PrunedWanMeta.teacher(WAN21_1_3B), 1.0),
                                ("PARE student (50% width)", student_meta(WAN21_1_3B), 1.0),
                                (f"PARE student, routed at {ROUTED_BUDGET:.0%}", student_meta(WAN21_1_3B),
                                 ROUTED_BUDGET)):
        blocks = model_block_macs(meta, tokens)
        base = sum_macs(blocks)
        for q, kv in RATIOS:
            attn = match = 0
            for width in meta.blocks:
                a, m = reduced_attention_macs(REAL_GRID, STRIDE, width.num_heads * meta.dims.head_dim, q, kv, 3)
                attn, match = attn + a, match + m
            total = (base.total - base.attn_core + attn + match) * budget
            rows.append({"model": label, "q_ratio": q, "kv_ratio": kv, "tokens": tokens,
                         "block_gmacs": total / 1e9, "attn_core_gmacs": attn * budget / 1e9,
                         "matching_gmacs": match * budget / 1e9})
    teacher = rows[0]["block_gmacs"]
    for r in rows:
        r["vs_teacher"] = r["block_gmacs"] / teacher
    return rows


def one_block_model(student: bool) -> WanTransformer:
    """A one-block 1.3B-width model with random weights (the teacher's, or pruned to half width)."""
    dims = replace(WAN21_1_3B, num_layers=1, text_dim=64)
    sd, meta = random_wan_state_dict(dims, seed=0), PrunedWanMeta.teacher(dims)
    if student:
        sd, meta = prune_state_dict(sd, meta, half_width(meta))
    return WanTransformer.from_state_dict(sd, meta)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). With one thread the CPU time is the compute time even when other
    programs share the machine; the wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


BLOCK_RATIOS = [(0.0, 0.0), (0.5, 0.5), (0.7, 0.7), (0.5, 0.25)]  # whole-block timings (matching cached)


def wall_times(grid: tuple[int, int, int], reps: int) -> list[dict]:
    """Interleaved timings: every repetition runs every configuration once; round 0 warms up and is dropped."""
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(0)
    configs = []  # (model label, part, q, kv, matching, fn)
    for label, student in (("teacher", False), ("PARE student", True)):
        model = one_block_model(student)
        heads, d = model.blocks[0].self_attn.num_heads, model.dims.head_dim
        x = torch.randn(1, n, model.dims.dim, generator=gen)
        e = 0.1 * torch.randn(1, 6, model.dims.dim, generator=gen)
        ctx = torch.randn(1, 512, model.dims.dim, generator=gen)
        freqs = rope_freqs(grid, d)
        q, k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(3))
        for qr, kvr in RATIOS:
            for every_step in ((True, False) if qr or kvr else (True,)):
                q_m = plan_matching(q, grid, STRIDE) if qr else None
                kv_m = plan_matching(v, grid, STRIDE) if kvr else None

                def attn_op(qr=qr, kvr=kvr, every_step=every_step, q_m=q_m, kv_m=kv_m, q=q, k=k, v=v):
                    qm = (plan_matching(q, grid, STRIDE) if every_step else q_m) if qr else None
                    km = (plan_matching(v, grid, STRIDE) if every_step else kv_m) if kvr else None
                    return reduced_attention(q, k, v, sdpa_attend, Reduction(qm, qr) if qr else None,
                                             Reduction(km, kvr) if kvr else None)

                configs.append((label, "attention", qr, kvr, "every step" if every_step else "cached", attn_op))
        for qr, kvr in BLOCK_RATIOS:
            sched = TokenSchedule((ReductionRule("q", (0,), qr), ReductionRule("kv", (0,), kvr)), num_blocks=1)
            tr = TokenReduction(model, sched, lambda p: 1.0 - p, cache_steps=10 ** 9)  # matching made in warm-up
            tr.begin_call(0.5, grid)

            def block(model=model, tr=tr, x=x, e=e, ctx=ctx, freqs=freqs):
                attn = model.blocks[0].self_attn
                attn.forward = tr._forward(attn, 0)
                try:
                    return model.blocks[0](x, e, freqs, ctx)
                finally:
                    del attn.forward

            tr.remove()
            configs.append((label, "block", qr, kvr, "cached", block))
    times: dict[tuple, list[tuple[float, float]]] = {c[:5]: [] for c in configs}
    with torch.no_grad():
        for rep in range(reps + 1):
            for *key, fn in configs:
                t = timed(fn)
                if rep:
                    times[tuple(key)].append(t)
            logger.info("round %d/%d done", rep, reps)
    rows = []
    for (label, part, qr, kvr, matching), t in times.items():
        base = "every step" if part == "attention" else "cached"
        row = {"part": part, "model": label, "q_ratio": qr, "kv_ratio": kvr, "matching": matching, "tokens": n}
        for j, clock in enumerate(("wall", "cpu")):
            mine = [x[j] for x in t]
            same = min(x[j] for x in times[(label, part, 0.0, 0.0, base)])
            teacher = min(x[j] for x in times[("teacher", part, 0.0, 0.0, base)])
            row.update({f"{clock}_min_s": min(mine), f"{clock}_median_s": statistics.median(mine),
                        f"{clock}_vs_same_model_full": min(mine) / same, f"{clock}_vs_teacher_full": min(mine) / teacher})
        rows.append(row)
    return rows


def markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="4,16,28", help="token grid frames,rows,columns for the wall time")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = tuple(int(s) for s in args.grid.split(","))
    compute = compute_table()
    print("## Compute per step (analytic, 1.3B, 81 frames 480x832, matching cached 3 steps)\n")
    print(markdown(compute, ["model", "q_ratio", "kv_ratio", "block_gmacs", "attn_core_gmacs", "matching_gmacs",
                             "vs_teacher"]))
    wall = wall_times(grid, args.reps)
    print(f"\n## Wall time, one 1.3B-width block, {wall[0]['tokens']} tokens {grid}, {args.threads} thread(s), "
          f"min of {args.reps} (median beside)\n")
    print(markdown(wall, ["part", "model", "q_ratio", "kv_ratio", "matching", "wall_min_s", "wall_median_s",
                          "wall_vs_same_model_full", "cpu_min_s", "cpu_vs_same_model_full", "cpu_vs_teacher_full"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"grid": grid, "threads": args.threads, "reps": args.reps,
                                              "compute": compute, "wall": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
