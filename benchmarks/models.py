"""The bench's models: a uniformly pruned student of a spec, the fixed routing decision set, and the checkpoint
files the measured suites load (random weights, cached under PARE_CACHE/bench so a rerun does not rebuild them).

Plain torch and the core only (no ComfyUI): the analytic suite uses it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from comfyui_pare.alignment import align_plan
from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.router import BlockRouter, RouterSpec, RoutingPolicy, decide, save_router
from comfyui_pare.surgery import BlockPlan, PrunePlan, plan_selections, prune_state_dict
from comfyui_pare.wan import WanDims
from training.tiny import random_wan_state_dict, scale_to_fp8

logger = logging.getLogger(__name__)

CACHE = Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "comfyui-pare")) / "bench"
PIN_FIRST = PIN_LAST = 1  # PARE Apply Router's defaults


def uniform_plan(dims: WanDims, head_fraction: float, ffn_fraction: float) -> PrunePlan:
    """Every block keeps the same share of heads and FFN neurons (evenly spread indices), rounded up to the
    tensor-core grain as ``prune`` does by default: the widths users get (14B at 70% FFN: 9677 -> 9728)."""
    def spread(total: int, fraction: float) -> tuple[int, ...]:
        keep = max(1, round(total * fraction))
        return tuple(sorted({int(i * total / keep) for i in range(keep)}))

    block = BlockPlan(heads=spread(dims.num_heads, head_fraction), ffn=spread(dims.ffn_dim, ffn_fraction))
    return align_plan(PrunePlan(tuple(block for _ in range(dims.num_layers))), PrunedWanMeta.teacher(dims))


def pruned_meta(dims: WanDims, head_fraction: float, ffn_fraction: float) -> PrunedWanMeta:
    return plan_selections(PrunedWanMeta.teacher(dims), uniform_plan(dims, head_fraction, ffn_fraction))[1]


def router_logits(num_blocks: int) -> list[float]:
    """The bench router's constant logits: descending with depth, so a budget keeps the earliest blocks."""
    return [4.0 - 8.0 * i / max(1, num_blocks - 1) for i in range(num_blocks)]


def bench_router(dims: WanDims) -> BlockRouter:
    """A router whose decisions are fixed (constant logits) but which still runs on every call: its overhead is real."""
    return BlockRouter.constant(RouterSpec(num_blocks=dims.num_layers, dim=dims.dim), router_logits(dims.num_layers))


def decision_set(costs: list[float], budget: float) -> list[bool]:
    """The blocks the bench router runs at ``budget`` (PARE Apply Router's rule, pins included)."""
    logits = torch.tensor([router_logits(len(costs))])
    policy = RoutingPolicy(budget=budget, pin_first=PIN_FIRST, pin_last=PIN_LAST)
    return decide(logits, policy, costs)[0].tolist()


def fp8_scaled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout of a state dict (as its ``*_fp8_scaled`` Wan releases): every 2-D block weight in
    scaled float8_e4m3fn, the rest as it is, an empty marker (ComfyUI runs fp8 matrix multiplies where it can)."""
    return scale_to_fp8(sd, lambda key, v: key.startswith("blocks.") and key.endswith(".weight") and v.ndim == 2)


@dataclass(frozen=True)
class BenchFiles:
    folder: Path
    teacher: str  # file names inside ``folder`` (ComfyUI's diffusion_models)
    student: str
    router: str  # inside ``folder`` too (PARE Load Router's folder in a real install)
    teacher_meta: PrunedWanMeta
    student_meta: PrunedWanMeta
    student_fp8_scaled: str = "student_fp8_scaled.safetensors"  # made on demand (ensure_fp8_scaled)

    def size_ratio(self) -> float:
        return (self.folder / self.student).stat().st_size / (self.folder / self.teacher).stat().st_size

    def ensure_fp8_scaled(self) -> str:
        """The student in the fp8_scaled layout (built once beside the others); its file name."""
        path = self.folder / self.student_fp8_scaled
        if not path.exists():
            from comfyui_pare.safetensors_io import save_atomic
            from comfyui_pare.wan_reader import load_checkpoint

            sd, meta = load_checkpoint(self.folder / self.student)
            save_atomic(path, fp8_scaled(sd), meta.to_header())
        return self.student_fp8_scaled


def bench_files(dims: WanDims, head_fraction: float, ffn_fraction: float, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> BenchFiles:
    """Teacher (random weights, fan-in scaled), its uniformly pruned student and the bench router, cached."""
    key = json.dumps([dims.to_dict(), head_fraction, ffn_fraction, seed, str(dtype), 2], sort_keys=True)  # 2: aligned
    folder = CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    names = ("teacher.safetensors", "student.safetensors", "router.safetensors")
    teacher_meta = PrunedWanMeta.teacher(dims)
    plan = uniform_plan(dims, head_fraction, ffn_fraction)
    if not all((folder / n).exists() for n in names):
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("building the bench checkpoints in %s (once)", folder)
        sd = random_wan_state_dict(dims, seed=seed, dtype=dtype)
        save_checkpoint(folder / names[0], sd, teacher_meta)
        student, student_meta = prune_state_dict(sd, teacher_meta, plan)
        save_checkpoint(folder / names[1], student, student_meta)
        save_router(folder / names[2], bench_router(dims))
        (folder / "spec.json").write_text(key)
    return BenchFiles(folder, *names, teacher_meta, plan_selections(teacher_meta, plan)[1])
