"""A tiny stage-2 pipeline for the route tests: teacher, calibration samples and stats, pruned student, config."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from comfyui_pare.calibration import write_sample
from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.wan import WanDims
from training.__main__ import main as training_main
from training.tiny import random_wan_state_dict

DIMS = WanDims(dim=64, num_heads=4, ffn_dim=128, num_layers=6, text_dim=32)
LATENT = (16, 3, 8, 8)
TEXT_TOKENS = 8
SAMPLES = 6


EARLY, LATE = (1, 2), (3, 4)  # blocks that matter only at high / only at low noise (0 and 5 are pinned)
GATE = 0.5


def when_blocks_matter_teacher(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny Wan whose blocks 1-2 contribute only at high noise and blocks 3-4 only at low noise.

    The shared time projection puts +GATE * s(t) on the residual gates of channels P (the first half) and
    -GATE * s(t) on channels Q (the second half), with s(t) = SiLU(SiLU(20 t / 1000 - 10)) / 10 (from the
    lowest-frequency sin feature): about 0 below t = 500, rising to 1 at t = 1000. Early blocks write only to P with zero base gates: gate = GATE * s(t).
    Late blocks write only to Q with base gates GATE: gate = GATE * (1 - s(t)). Their cross-attention is off, so
    a block's whole contribution follows its gate. A static schedule must give up one group at every step.
    """
    sd = random_wan_state_dict(DIMS, seed=seed)
    d, half = DIMS.dim, DIMS.dim // 2
    p, q = slice(0, half), slice(half, d)
    freq = 10000.0 ** (-(128 - 1) / 128)  # the lowest frequency of Wan's 256-d embedding (its last sin column)
    for key in ("time_embedding.0", "time_embedding.2", "time_projection.1"):
        sd[f"{key}.weight"].zero_()
        sd[f"{key}.bias"].zero_()
    sd["time_embedding.0.weight"][0, 255] = 20.0 / math.sin(1000.0 * freq)  # h = 20 t / 1000 - 10 (nearly linear)
    sd["time_embedding.0.bias"][0] = -10.0
    sd["time_embedding.2.weight"][0, 0] = 1.0
    for chunk in (2, 5):  # gate of self-attention, gate of the FFN
        rows = sd["time_projection.1.weight"][chunk * d:(chunk + 1) * d]
        rows[p, 0], rows[q, 0] = GATE / 10.0, -GATE / 10.0
    for blocks, own, other, base in ((EARLY, p, q, 0.0), (LATE, q, p, GATE)):
        for i in blocks:
            pre = f"blocks.{i}."
            for key in ("self_attn.o", "ffn.2"):
                sd[pre + key + ".weight"][other] = 0.0
                sd[pre + key + ".bias"][other] = 0.0
            sd[pre + "cross_attn.o.weight"].zero_()
            sd[pre + "cross_attn.o.bias"].zero_()
            sd[pre + "modulation"][0, 2, own] = base
            sd[pre + "modulation"][0, 5, own] = base
    return sd


def build_inputs(root: Path, seed: int = 0) -> dict[str, Path]:
    """Teacher, samples, calibration stats and a pruned student under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    sd = when_blocks_matter_teacher(seed)
    teacher = root / "teacher.safetensors"
    save_checkpoint(teacher, sd, PrunedWanMeta.teacher(DIMS))
    samples = root / "samples"
    samples.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(SAMPLES):
        write_sample(samples / f"s{i}.safetensors", torch.randn(TEXT_TOKENS, DIMS.text_dim, generator=gen),
                     latent_shape=LATENT, seed=100 + i, latent=torch.randn(LATENT, generator=gen), prompt=f"p{i}")
    stats = root / "stats.safetensors"
    assert training_main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out", str(stats),
                          "--timesteps", "6", "--shift", "1.0", "--query-rows", "16", "--device", "cpu"]) == 0
    plan = PrunePlan(tuple(BlockPlan(heads=(0, 1, 2), ffn=tuple(range(96))) for _ in range(DIMS.num_layers)))
    student_sd, student_meta = prune_state_dict(sd, PrunedWanMeta.teacher(DIMS), plan)
    student = root / "student.safetensors"
    save_checkpoint(student, student_sd, student_meta)
    return {"teacher": teacher, "samples": samples, "stats": stats, "student": student}


def write_config(path: Path, inputs: dict[str, Path], out: Path, steps: int, budget: float = 0.5,
                 checkpointing_steps: int = 100, batch_size: int = 4, extra: str = "") -> Path:
    path.write_text(f"""
[model]
teacher = "{inputs['teacher']}"
student = "{inputs['student']}"

[data]
samples = "{inputs['samples']}"

[flow]
shift = 1.0

[train]
output_dir = "{out}"
steps = {steps}
batch_size = {batch_size}
learning_rate = 3e-4
checkpointing_steps = {checkpointing_steps}
device = "cpu"

[route]
budget = {budget}
router_learning_rate = 0.03
hidden = 32
# The tiny samples' contexts are random vectors: no content to read, only noise to memorise. And this 40-step run
# needs the old fast router rate, at which LayerNorm'd features die (measured: all units dead, the stage stops with
# RouterCollapsed): the format-1 router of before, which stays alive here.
text_input = false
layer_norm = false
stats = "{inputs['stats']}"
eval_samples = 6
eval_sigmas = 4
{extra}
""")
    return path
