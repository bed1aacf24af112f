"""``python -m training estimate``: what a distill/route run needs per GPU and what it costs, before it runs.

From the shapes only (a checkpoint's header, or a named Wan2.1 size) and the run's settings it prints, per GPU under
FSDP2 over ``--gpus`` GPUs:

* student state, sharded: float32 weights (4 bytes/parameter), gradients (4), AdamW moments (8), EMA (4 if on);
* the frozen teacher's shard (2 bytes/parameter in bf16, 4 in float32);
* what FSDP2 gathers at once: two blocks of the student and two of the teacher in the compute dtype (the block
  running and the next one prefetched);
* activations of this GPU's samples at the token count: with activation checkpointing each block keeps its input
  (tokens x dim) and one block's activations exist while it is recomputed; without, every block keeps them all;
* the teacher forward's working set (no gradients: one block's largest intermediates).

Activation model (bf16, flash/memory-efficient attention, so no tokens^2 matrix): a block keeps about
(16 dim + 10 kept_heads x head_dim + 2 ffn) values per token for backward, counted from ``training.model.WanBlock``
(LayerNorm and modulation inputs, q/k/v and their RMSNorm inputs, RoPE's float32 copies of q and k, attention
q/k/v/output, FFN input and its GELU input and output). A run fits when the total is at most ``HEADROOM`` of the
GPU's memory (the rest: CUDA context, allocator fragmentation, NCCL buffers).

Time: a step is the teacher's forward plus the student's forward and backward (3 forwards; 4 with checkpointing's
recompute), counted in MACs (``comfyui_pare.compute``) and converted to seconds at the throughput *measured* on an
H200 at Wan2.1-14B width (``MEASURED``: one block's forward at 32,760 tokens). That assumes backward runs at the
forward's FLOP rate and that FSDP2's communication overlaps the compute; both are assumptions, not measurements.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from comfyui_pare.compute import block_macs, embed_head_macs, tokens_for
from comfyui_pare.errors import PareFormatError
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import WAN21_1_3B, WAN21_14B, WAN21_14B_I2V, WAN22_TI2V_5B, BlockWidth
from comfyui_pare.wan_reader import open_wan

HELP = "memory per GPU and time per step of a distill/route run, from the shapes (does it fit on N GPUs?)"
GB = 1e9
HEADROOM = 0.9  # share of a GPU's memory a run may plan to use
NAMED = {"wan2.1-1.3b": WAN21_1_3B, "wan2.1-14b": WAN21_14B, "wan2.1-14b-i2v": WAN21_14B_I2V,
         "wan2.2-ti2v-5b": WAN22_TI2V_5B}
# Measured (issue 21, H200, torch 2.11 + CUDA 13, ComfyUI's KSampler, 16-bit): Wan2.1-14B width, 8 blocks, 32,760
# tokens, CFG batch 2: 1.268 s per step, i.e. one block's forward on one sample in 1.268 / 8 / 2 s.
MEASURED = {"gpu": "H200", "dims": WAN21_14B, "tokens": 32760, "block_forward_s": 1.268 / 8 / 2}


@dataclass(frozen=True)
class RunShape:
    """What a run's memory and time depend on besides the two models."""

    gpus: int
    gpu_memory_gb: float
    tokens: int  # video tokens per sample
    text_tokens: int = 512
    batch: int = 8  # global batch (samples per step, over all GPUs)
    teacher_bytes: int = 2  # bf16 teacher (4: float32)
    compute_bytes: int = 2  # bf16 mixed precision (4: float32 compute)
    ema: bool = False
    gradient_checkpointing: bool = True
    cached_targets: bool = False  # data.target_cache: no teacher forward in the step

    @property
    def per_gpu_batch(self) -> float:
        return self.batch / self.gpus


def _params(shapes: dict[str, tuple[int, ...]], prefix: str | None = None) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if prefix is None or k.startswith(prefix))


def block_params(meta: PrunedWanMeta) -> list[int]:
    """Parameters of each block."""
    shapes = meta.expected_shapes()
    return [_params(shapes, f"blocks.{i}.") for i in range(meta.num_blocks)]


def activation_values(meta: PrunedWanMeta, i: int, tokens: int) -> int:
    """Values block ``i`` keeps for backward per sample (see the module docstring)."""
    d, width = meta.dims.dim, meta.blocks[i]
    return tokens * (16 * d + 10 * width.num_heads * meta.dims.head_dim + 2 * width.ffn_dim)


def memory_per_gpu(teacher: PrunedWanMeta, student: PrunedWanMeta, run: RunShape) -> dict[str, float]:
    """Bytes per GPU, by item (``activations`` under ``run.gradient_checkpointing``; both variants listed)."""
    g, cb, m = run.gpus, run.compute_bytes, run.per_gpu_batch
    ps, pt = _params(student.expected_shapes()), _params(teacher.expected_shapes())
    sb, tb = block_params(student), block_params(teacher)
    acts = [activation_values(student, i, run.tokens) * cb for i in range(student.num_blocks)]
    kept_inputs = student.num_blocks * run.tokens * student.dims.dim * cb
    with_ckpt = m * (kept_inputs + max(acts))
    without = m * sum(acts)
    d = teacher.dims
    teacher_work = m * run.tokens * (d.ffn_dim + 4 * d.dim) * cb * 2  # FFN hidden + GELU out, q/k/v/out
    out = {
        "student weights (fp32, sharded)": 4 * ps / g,
        "student gradients (fp32, sharded)": 4 * ps / g,
        "AdamW moments (fp32, sharded)": 8 * ps / g,
        "EMA of the weights (fp32, sharded)": 4 * ps / g if run.ema else 0.0,
        "teacher shard (frozen)": run.teacher_bytes * pt / g,
        "gathered blocks (2 student + 2 teacher)": 2 * (max(sb) + max(tb)) * cb,
        "teacher forward working set": 0.0 if run.cached_targets else teacher_work,
        "activations": with_ckpt if run.gradient_checkpointing else without,
    }
    out["total"] = sum(out.values())
    out["activations with checkpointing"] = with_ckpt
    out["activations without checkpointing"] = without
    return out


def step_seconds(teacher: PrunedWanMeta, student: PrunedWanMeta, run: RunShape) -> dict[str, float]:
    """Per-GPU step time at the measured H200 throughput (``MEASURED``), and the MACs it is computed from."""
    ref = MEASURED["dims"]
    ref_macs = block_macs(ref, BlockWidth.full(ref), MEASURED["tokens"]).total
    macs_per_s = ref_macs / MEASURED["block_forward_s"]

    def forward(meta: PrunedWanMeta) -> int:
        blocks = sum(block_macs(meta.dims, w, run.tokens, run.text_tokens).total for w in meta.blocks)
        return blocks + embed_head_macs(meta.dims, run.tokens, run.text_tokens)

    passes = 4 if run.gradient_checkpointing else 3  # forward + backward (2 forwards' worth) + recompute
    macs = run.per_gpu_batch * ((0 if run.cached_targets else forward(teacher)) + passes * forward(student))
    return {"macs_per_gpu": float(macs), "seconds": macs / macs_per_s, "measured_macs_per_s": macs_per_s}


def uniform_student(teacher: PrunedWanMeta, heads: float, ffn: float, multiple: int = 64) -> PrunedWanMeta:
    """A student keeping ``heads`` of each block's heads and ``ffn`` of its FFN (rounded to ``multiple``)."""
    d = teacher.dims
    h = max(1, round(d.num_heads * heads))
    f = min(d.ffn_dim, max(multiple, round(d.ffn_dim * ffn / multiple) * multiple))
    return PrunedWanMeta(d, tuple(BlockWidth(tuple(range(h)), tuple(range(f))) for _ in range(d.num_layers)))


def read_meta(source: str) -> PrunedWanMeta:
    """A checkpoint's meta (header only), or a named size (``NAMED``: ``wan2.1-14b``, ``wan2.2-ti2v-5b``, ...)."""
    if source.lower() in NAMED:
        return PrunedWanMeta.teacher(NAMED[source.lower()])
    with open_wan(source) as reader:
        return reader.meta


def parse_video(text: str, dims=None) -> int:
    """Video tokens of 'FRAMESxHEIGHTxWIDTH' (pixels, as ComfyUI's Wan latent nodes take them) for a model of
    ``dims``' family (its VAE stride: 8 for Wan2.1, 16 for the Wan2.2 5B VAE)."""
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PareFormatError(f"--video must be FRAMESxHEIGHTxWIDTH (e.g. 81x480x832), got {text!r}") from None
    return tokens_for(frames, height, width, dims)


def report(teacher: PrunedWanMeta, student: PrunedWanMeta, run: RunShape, steps: int) -> dict:
    mem = memory_per_gpu(teacher, student, run)
    time = step_seconds(teacher, student, run)
    return {"gpus": run.gpus, "gpu_memory_gb": run.gpu_memory_gb, "tokens": run.tokens, "batch": run.batch,
            "memory_gb": {k: v / GB for k, v in mem.items()},
            "fits": mem["total"] <= HEADROOM * run.gpu_memory_gb * GB,
            "step_seconds": time["seconds"], "steps": steps,
            "gpu_hours": steps * time["seconds"] * run.gpus / 3600,
            "teacher_params": _params(teacher.expected_shapes()), "student_params": _params(student.expected_shapes())}


def format_report(r: dict, run: RunShape) -> str:
    lines = [f"teacher {r['teacher_params'] / 1e9:.2f}B parameters, student {r['student_params'] / 1e9:.2f}B; "
             f"{r['gpus']} GPUs x {r['gpu_memory_gb']:g} GB, FSDP2; {r['tokens']} video tokens per sample, global "
             f"batch {r['batch']} ({run.per_gpu_batch:g} per GPU)", "", "memory per GPU (GB):"]
    for key, value in r["memory_gb"].items():
        if key == "total":
            lines.append(f"  {'total':<44}{value:8.1f}   (fits in {HEADROOM:.0%} of {r['gpu_memory_gb']:g} GB: "
                         f"{'yes' if r['fits'] else 'NO'})")
        elif key.startswith("activations "):
            lines.append(f"    {key:<42}{value:8.1f}")
        else:
            lines.append(f"  {key:<44}{value:8.1f}")
    lines += ["", f"step: {r['step_seconds']:.1f} s per GPU at the throughput measured on an {MEASURED['gpu']} "
              f"(14B width, {MEASURED['tokens']} tokens); {r['steps']} steps: {r['gpu_hours']:.1f} GPU-hours"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint (any layout; only its header is read) or "
                   f"a size: {', '.join(NAMED)}")
    p.add_argument("--student", default=None, help="student checkpoint (header only); default: a uniform student "
                   "with --heads / --ffn of the teacher's widths")
    p.add_argument("--heads", type=float, default=0.75, help="kept share of heads for the default student")
    p.add_argument("--ffn", type=float, default=0.7, help="kept share of FFN neurons for the default student")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, required=True, help="GB per GPU (80 for H100, 141 for H200)")
    p.add_argument("--video", default="81x480x832", help="FRAMESxHEIGHTxWIDTH of the training clips (the 5B's "
                   "native: 121x704x1280)")
    p.add_argument("--tokens", type=int, default=None, help="video tokens per sample (overrides --video)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="global batch (train.batch_size)")
    p.add_argument("--steps", type=int, default=2000, help="steps, for the GPU-hours")
    p.add_argument("--teacher-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16")
    p.add_argument("--ema", action="store_true", help="train.ema_decay > 0")
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--cached-targets", action="store_true", help="data.target_cache: the step runs no teacher")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1 or args.gpu_memory <= 0 or args.batch < 1:
        raise PareFormatError("--gpus, --gpu-memory and --batch must be positive")
    teacher = read_meta(args.teacher)
    student = read_meta(args.student) if args.student else uniform_student(teacher, args.heads, args.ffn)
    if student.dims != teacher.dims:
        raise PareFormatError(f"--student {args.student} was pruned from another teacher (dims {student.dims} vs "
                              f"{teacher.dims})")
    shape = RunShape(args.gpus, args.gpu_memory, args.tokens or parse_video(args.video, teacher.dims), args.text_tokens,
                     args.batch, 2 if args.teacher_dtype == "bfloat16" else 4,
                     2 if args.mixed_precision == "bf16" else 4, args.ema, args.checkpointing, args.cached_targets)
    r = report(teacher, student, shape, args.steps)
    print(json.dumps(r, indent=1) if args.json else format_report(r, shape))
    return 0
