"""Suite 'token_reduction': PARE Token Reduction (AsymRnR) over reduction ratios, alone and on a PARE student.

* **Analytic** (real shapes): per-step MACs of Wan2.1 1.3B and 14B at 480p and 720p, 81 frames, for the teacher,
  the bench's pruned student and that student with the bench's routing decision set, each with queries and
  keys/values reduced at ratio r on every block (``comfyui_pare.token_reduction.reduced_attention_macs``; the
  matching, cached for 3 steps, is counted).
* **Measured**: step time through ComfyUI's KSampler with the real node (PARE Token Reduction, a custom schedule
  reducing every block) on the bench's 1.3B-width models: teacher, pruned student, pruned + routed, each at several
  ratios. On a GPU the profile's shape (480p); on the CPU a 1,792-token grid, one step and CFG 1, so attention is a
  visible share and a run takes minutes. Rounds are interleaved (benchmarks/timing.py), the first is a warm-up;
  times are relative to the same model without reduction.
"""

from __future__ import annotations

import importlib
import json
import logging
import statistics

import torch

import comfy_library
from comfyui_pare.compute import model_block_macs, tokens_for
from comfyui_pare.model_family import token_grid
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.token_reduction import reduced_attention_macs
from comfyui_pare.wan import TEXT_TOKENS

from . import comfy_timing
from .analytic import FRAMES, MODELS, RESOLUTIONS, step_macs
from .config import BenchConfig
from .models import PIN_FIRST, PIN_LAST, bench_files, decision_set, pruned_meta
from .timing import interleaved, stats

logger = logging.getLogger(__name__)
RATIOS = (0.0, 0.25, 0.5, 0.7)  # q = kv = r on every block
MEASURED_RATIOS = (0.0, 0.5, 0.7)
STRIDE = (1, 2, 2)
CACHE_STEPS = 3
CPU_LATENT, CPU_STEPS, CPU_CFG = (4, 32, 56), 1, 1.0  # 4 x 16 x 28 = 1,792 tokens


def reduced_step_macs(meta: PrunedWanMeta, grid: tuple[int, int, int], ratio: float, run: list[bool] | None) -> int:
    """One forward's MACs with q = kv = ``ratio`` on every block that runs (the router's own MACs when routed)."""
    tokens = grid[0] * grid[1] * grid[2]
    base = step_macs(meta, tokens, TEXT_TOKENS, run, with_router=run is not None)
    run = run or [True] * meta.num_blocks
    reduced = sum(sum(reduced_attention_macs(grid, STRIDE, w.num_heads * meta.dims.head_dim, ratio, ratio, CACHE_STEPS))
                  for w, on in zip(meta.blocks, run, strict=True) if on)
    return base["total"] - base["parts"]["attn_core"] + reduced


def analytic(config: BenchConfig) -> list[dict]:
    rows = []
    for model_name, dims in MODELS.items():
        teacher = PrunedWanMeta.teacher(dims)
        student = pruned_meta(dims, config.head_fraction, config.ffn_fraction)
        for res_name, (height, width) in RESOLUTIONS.items():
            tokens = tokens_for(FRAMES, height, width)
            grid = token_grid(dims.spec.latent.latent_size(FRAMES, height, width), dims.spec.patch_size)
            costs = [float(m.total) for m in model_block_macs(student, tokens, TEXT_TOKENS)]
            routed = decision_set(costs, config.routed_budget)
            base = step_macs(teacher, tokens, TEXT_TOKENS)["total"]
            for name, meta, run in (("teacher", teacher, None), ("pruned", student, None),
                                    ("pruned_routed", student, routed)):
                for r in RATIOS:
                    rows.append({"model": model_name, "resolution": res_name, "tokens": tokens, "config": name,
                                 "ratio": r, "teacher_equivalent": reduced_step_macs(meta, grid, r, run) / base})
    return rows


def _schedule(num_blocks: int, ratio: float) -> str:
    return json.dumps({"num_blocks": num_blocks, "rules": [{"feature": f, "blocks": "all", "ratio": ratio}
                                                           for f in ("q", "kv")]})


def measured(config: BenchConfig, progress=None) -> dict:
    comfy = comfy_library.load_comfy(config.device)
    node = importlib.import_module(f"{comfy_library.PACK_MODULE}.nodes.token_reduction_nodes").PARETokenReduction
    files = bench_files(config.dims, config.head_fraction, config.ffn_fraction, config.seed,
                        getattr(torch, config.weights_dtype))
    comfy.add_model_folder("diffusion_models", files.folder)
    if config.device == "cuda":
        latent, steps, cfg = config.shape.latent, config.shape.steps, config.shape.cfg
    else:
        latent, steps, cfg = CPU_LATENT, CPU_STEPS, CPU_CFG
    teacher, student = comfy_library.pare_unet(comfy, files.teacher), comfy_library.pare_unet(comfy, files.student)
    from comfyui_pare.router import load_router

    router = load_router(files.folder / files.router)
    router.pare_name = files.router
    bases = {"teacher": teacher, "pruned": student,
             "pruned_routed": comfy_library.apply_router(comfy, student, router, config.routed_budget, PIN_FIRST, PIN_LAST)}
    models = {}
    for base_name, model in bases.items():
        for r in MEASURED_RATIOS:
            m = model if r == 0 else node.execute(model, "custom", 1.0, CACHE_STEPS, 0.0, 1.0,
                                                  schedule_json=_schedule(config.dims.num_layers, r)).result[0]
            models[f"{base_name}_r{r:g}"] = comfy_timing.timed(comfy, comfy_library.with_shift(comfy, m, config.shape.shift))
    gen = torch.Generator().manual_seed(config.seed)
    ctx, neg = (torch.randn(1, config.shape.text_tokens, config.dims.text_dim, generator=gen) for _ in range(2))
    empty = torch.zeros(1, 16, *latent)

    def sample(name: str) -> float:
        model, times = models[name]
        times.seconds.clear()
        with torch.inference_mode():
            comfy_library.ksample(comfy, model, ctx, neg, empty, steps, cfg, seed=config.seed)
        return statistics.median(times.seconds)

    names = list(models)
    step_times = interleaved(names, sample, min(config.repeats, 3), config.warmup, on_round=progress)
    rows = []
    for name in names:
        base_name, r = name.rsplit("_r", 1)
        rel = stats([a / b for a, b in zip(step_times[name], step_times[f"{base_name}_r0"], strict=True)])
        vs_teacher = stats([a / b for a, b in zip(step_times[name], step_times["teacher_r0"], strict=True)])
        rows.append({"model": base_name, "ratio": float(r), "step_seconds": stats(step_times[name]).to_json(),
                     "time_vs_same_model": rel.to_json(), "time_vs_teacher": vs_teacher.to_json()})
    tokens = latent[0] * -(-latent[1] // 2) * -(-latent[2] // 2)
    return {"tokens": tokens, "steps": steps, "cfg": cfg, "dims": config.dims.to_dict(), "rows": rows}


def run(config: BenchConfig, progress=None) -> dict:
    return {"analytic": analytic(config), "measured": measured(config, progress)}


def table(result: dict) -> list[str]:
    lines = ["Token reduction (q = kv = r on every block), analytic per-step compute in teacher forwards "
             f"(matching cached {CACHE_STEPS} steps):",
             f"{'model':6} {'res':5} {'config':14} " + " ".join(f"{'r=' + format(r, 'g'):>7}" for r in RATIOS)]
    groups: dict[tuple, dict] = {}
    for row in result["analytic"]:
        groups.setdefault((row["model"], row["resolution"], row["config"]), {})[row["ratio"]] = row["teacher_equivalent"]
    for (model, res, conf), by_ratio in groups.items():
        lines.append(f"{model:6} {res:5} {conf:14} " + " ".join(f"{by_ratio[r]:>7.3f}" for r in RATIOS))
    m = result["measured"]
    lines.append(f"Measured through ComfyUI's KSampler with PARE Token Reduction: {m['tokens']} tokens, "
                 f"{m['steps']} step(s), CFG {m['cfg']:g}, {m['dims']['num_layers']} blocks at dim {m['dims']['dim']}")
    for row in m["rows"]:
        s, rel, vt = row["step_seconds"], row["time_vs_same_model"], row["time_vs_teacher"]
        lines.append(f"  {row['model']:14} r={row['ratio']:<4g} step {s['median']:.3f}s (min {s['min']:.3f}s)  "
                     f"vs same model {rel['median']:.2f}  vs teacher {vt['median']:.2f}")
    return lines
