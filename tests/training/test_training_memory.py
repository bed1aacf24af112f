"""No phase of a training run holds the teacher more than once (issue 32): every rank's resident set, sampled from
outside twice a second (``training.memory_probe``) and measured exactly per phase inside (``resources.json``), through
a whole ``distill`` and ``route`` run on 2 CPU ranks (torchrun, gloo, FSDP2) and a ``distill`` run in one process,
on a teacher of 32 blocks. glibc's mmap threshold is fixed low (``MALLOC_MMAP_THRESHOLD_``) so that the resident set
shows what the program holds, not what the allocator caches.

The real-proportion measurement (1.3B width) is ``scripts/bench_training_memory.py``; its numbers are in
training/README.md."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO
from training_helpers import distill_toml, write_samples

from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import BlockWidth, WanDims
from training.memory_probe import run_watched, sampled_phase_peaks
from training.resources import PHASES
from training.tiny import write_random_wan

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
MIB, GIB = 1 << 20, 1 << 30
# 32 blocks at dim 384, FFN 4096 (16.6 MiB each in float32; 0.52 GiB in all). The student keeps 2 of its blocks
# (depth-pruned), 1 head and 64 FFN neurons each (11 MiB), so the teacher dominates every phase.
DIMS = WanDims(dim=384, num_heads=4, ffn_dim=4096, num_layers=32, text_dim=64)
STUDENT = PrunedWanMeta(DIMS, (BlockWidth((0,), tuple(range(64))),) * 2, kept_blocks=(0, DIMS.num_layers - 1))
# What a rank holds beyond its shards while FSDP2 gathers on gloo: a block's all-gather output, its unsharded
# parameters and gloo's buffers, for the teacher block running and the next one (measured: at most 7.4 blocks).
GATHERED_BLOCKS = 8
SLACK = 64 * MIB  # activations, collectives' first buffers, allocator pages (measured: at most ~45 MiB)


def _bytes(meta: PrunedWanMeta) -> int:
    return 4 * sum(math.prod(s) for s in meta.expected_shapes().values())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("memory")
    teacher, student = root / "teacher.safetensors", root / "student.safetensors"
    write_random_wan(teacher, PrunedWanMeta.teacher(DIMS), seed=0)
    write_random_wan(student, STUDENT, seed=1)
    t = _bytes(PrunedWanMeta.teacher(DIMS))
    return {"teacher": teacher, "student": student, "samples": write_samples(root / "samples", 2),
            "T": t, "B": t // DIMS.num_layers, "S": _bytes(STUDENT)}


def _run(inputs: dict, tmp_path: Path, stage: str, ranks: int) -> tuple[dict, dict[str, list[int]]]:
    """Run ``stage`` on ``ranks`` ranks (FSDP2) or in one process, watched; (resources.json, sampled peaks)."""
    out = tmp_path / stage
    # Stage 2 under a fixed skip of block 0: two steps cannot train a router that passes the health check (a
    # collapsed learned router ends the run); the memory is the same, the student trains under the router's gates.
    tables = ("[distill]\neval_samples = 1\n" if stage == "distill" else
              '[route]\nhidden = 8\npin_first = 0\nfixed_schedule = "0-0"\neval_samples = 1\neval_sigmas = 1\n')
    cfg = tmp_path / f"{stage}.toml"
    cfg.write_text(distill_toml(inputs["teacher"], inputs["student"], inputs["samples"], out, tables, steps=2,
                                batch_size=2, ema_decay=0.9, strategy="fsdp" if ranks > 1 else "none"))
    launch = [*TORCHRUN, str(ranks)] if ranks > 1 else [sys.executable]
    run = run_watched([*launch, "-m", "training", stage, "--config", str(cfg)], REPO, ENV, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "resources.json").read_text())
    return report, sampled_phase_peaks(run.samples, report)


def _table(report: dict, sampled: dict[str, list[int]]) -> str:
    return "\n".join(f"{p:>16}: peak {[round(v / MIB) for v in report['phase_peak_bytes'][p]]} MiB, sampled "
                     f"{[round(v / MIB) for v in sampled.get(p, [])]} MiB" for p in PHASES)


def _check_phases(report: dict, sampled: dict[str, list[int]], bound: dict[str, list[float]],
                  phases: tuple[str, ...]) -> None:
    """Every phase ran, and each one's exact peak and every sample taken in it are under its bound."""
    peaks = report["phase_peak_bytes"]
    for phase in phases:
        assert all(p > 0 for p in peaks[phase]), f"phase {phase} was not recorded: {peaks[phase]}"
        for rank, (peak, limit) in enumerate(zip(peaks[phase], bound[phase])):
            assert peak < limit, f"rank {rank}, {phase}: peak {peak / MIB:.0f} MiB >= bound {limit / MIB:.0f} MiB"
    for phase, values in sampled.items():
        for rank, (value, limit) in enumerate(zip(values, bound[phase])):
            assert value < limit, f"rank {rank}, {phase}: sampled {value / MIB:.0f} MiB >= bound {limit / MIB:.0f}"
    assert sum(len(v) > 0 for v in sampled.values()) >= 3  # the sampler saw the run through several phases


@pytest.mark.parametrize("stage", ["distill", "route"])
def test_two_ranks_hold_half_the_teacher_in_every_phase(inputs, tmp_path, stage):
    """2 ranks, FSDP2: each phase (loading, initial evaluation, forward/backward, optimizer step, EMA, DCP
    checkpoint, final evaluation, export) stays under half the teacher + the rank's baseline + the blocks FSDP2
    gathers + the sharded student state (weights, gradients, AdamW moments, EMA: 5 halves, and the whole student
    for route's export on rank 0) + slack; that bound is below a whole teacher, which a rank holding it would pass.
    Issue 32's acceptance, asserted too: the worst rank's peak over the whole run < half the teacher + baseline +
    4 blocks + 0.5 GiB."""
    report, sampled = _run(inputs, tmp_path, stage, 2)
    t, b, s = inputs["T"], inputs["B"], inputs["S"]
    base = report["host_baseline_bytes"]
    print(f"\n{stage}, 2 ranks: teacher {t / MIB:.0f} MiB, block {b / MIB:.1f} MiB, student {s / MIB:.1f} MiB, "
          f"baseline {[round(v / MIB) for v in base]} MiB\n{_table(report, sampled)}")
    limit = {p: [v + t / 2 + GATHERED_BLOCKS * b + 5 * s / 2 + s + SLACK for v in base] for p in PHASES}
    limit["load"] = [v + t / 2 + 2 * b + s + SLACK for v in base]  # one tensor slice at a time, nothing gathered
    assert all(lim - v < t for lim, v in zip(limit["forward_backward"], base))  # the bound is a real one
    # Stage 2 has no initial evaluation, and its final one (the router's threshold) is part of its export.
    phases = PHASES if stage == "distill" else tuple(p for p in PHASES if p not in ("initial_eval", "final_eval"))
    _check_phases(report, sampled, limit, phases)
    acceptance = [v + t / 2 + 4 * b + GIB / 2 for v in base]
    assert all(p < a for p, a in zip(report["host_peak_bytes"], acceptance)), (report["host_peak_bytes"], acceptance)
    load = report["teacher_load"]
    assert all(abs(v - t / 2) < b for v in load["bytes"]) and all(v > 0 for v in load["bytes_per_s"])


def test_one_process_holds_the_teacher_once(inputs, tmp_path):
    """One process: the teacher is read one tensor at a time into the dtype it runs in, so no phase holds more than
    the teacher + the student's training state (weights, gradients, AdamW moments, EMA) + slack. Issue 32's
    acceptance: the peak < teacher + student + its optimizer state + 1 GiB."""
    report, sampled = _run(inputs, tmp_path, "distill", 1)
    t, s = inputs["T"], inputs["S"]
    base = report["host_baseline_bytes"][0]
    print(f"\none process: teacher {t / MIB:.0f} MiB, baseline {base / MIB:.0f} MiB\n{_table(report, sampled)}")
    # Twice the slack of the sharded runs: the teacher's forward runs whole here (measured: 46 MiB above the teacher
    # and the student's training state at the optimizer step); a second teacher would still be 4x over it.
    limit = {p: [base + t + 5 * s + 2 * SLACK] for p in PHASES}
    limit["load"] = [base + t + s + 2 * SLACK]
    _check_phases(report, sampled, limit, PHASES)
    assert report["host_peak_bytes"][0] < t + s + 2 * s + GIB
    assert report["teacher_load"]["bytes"] == [t]
