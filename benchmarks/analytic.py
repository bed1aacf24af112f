"""Suite 'compute': analytic MACs per sampling step at real Wan shapes, split per part.

For Wan2.1 1.3B and 14B at 480p and 720p, 81 frames, and Wan2.2 TI2V-5B at its native 1280x704, 121 frames (16x
VAE): the teacher, the uniformly pruned student and the student
with the bench's fixed routing decision set, per part (attention core, self-attention projections,
cross-attention, FFN; embeddings + head apart); and end to end in teacher-equivalent forwards: CFG at 50 steps
(two forwards a step) against a 4-step CFG-free step-distill LoRA (one forward a step). Counted by
``comfyui_pare.compute`` (the same accounting the router's budget uses), checked against torch's FlopCounterMode
in tests/core/test_bench.py.
"""

from __future__ import annotations

from dataclasses import fields

from comfyui_pare.compute import BlockMacs, embed_head_macs, model_block_macs, sum_macs, tokens_for
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import TEXT_TOKENS, WAN21_1_3B, WAN21_14B, WAN22_TI2V_5B

from .config import BenchConfig
from .models import bench_router, decision_set, pruned_meta

MODELS = {"1.3B": WAN21_1_3B, "14B": WAN21_14B}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
FRAMES = 81
# (model, dims, resolution, (height, width), frames): every model at its native sizes.
SHAPES = [(m, dims, r, hw, FRAMES) for m, dims in MODELS.items() for r, hw in RESOLUTIONS.items()] + [
    ("5B", WAN22_TI2V_5B, "720p", (704, 1280), 121)]
PARTS = [f.name for f in fields(BlockMacs)]


def router_macs(meta: PrunedWanMeta, tokens: int) -> int:
    """MACs of one call of the bench router (pooling over the tokens + its MLP)."""
    return bench_router(meta.dims).macs(tokens)


def step_macs(meta: PrunedWanMeta, tokens: int, text_tokens: int, run: list[bool] | None = None,
              with_router: bool = False) -> dict:
    """One forward (batch 1): MACs per part over the blocks that run, embeddings + head, router, total."""
    blocks = model_block_macs(meta, tokens, text_tokens)
    ran = sum_macs([b for b, on in zip(blocks, run or [True] * len(blocks), strict=True) if on])
    other = embed_head_macs(meta.dims, tokens, text_tokens)
    router = router_macs(meta, tokens) if with_router else 0
    parts = {p: getattr(ran, p) for p in PARTS}
    return {"parts": parts, "blocks": ran.total, "embed_head": other, "router": router,
            "total": ran.total + other + router,
            "executed_fraction": ran.total / max(1, sum_macs(blocks).total)}


def configurations(meta_teacher: PrunedWanMeta, meta_student: PrunedWanMeta, tokens: int, text_tokens: int,
                   budget: float) -> dict[str, dict]:
    """teacher, pruned, pruned + routed (budget), teacher + routed (budget) for one shape."""
    out = {"teacher": step_macs(meta_teacher, tokens, text_tokens),
           "pruned": step_macs(meta_student, tokens, text_tokens)}
    for name, meta in (("pruned_routed", meta_student), ("teacher_routed", meta_teacher)):
        costs = [float(m.total) for m in model_block_macs(meta, tokens, text_tokens)]
        out[name] = step_macs(meta, tokens, text_tokens, decision_set(costs, budget), with_router=True)
    return out


def run(config: BenchConfig, progress=None) -> dict:
    rows = []
    for model_name, dims, res_name, (height, width), frames in SHAPES:
        teacher = PrunedWanMeta.teacher(dims)
        student = pruned_meta(dims, config.head_fraction, config.ffn_fraction)
        tokens = tokens_for(frames, height, width, dims)
        confs = configurations(teacher, student, tokens, TEXT_TOKENS, config.routed_budget)
        base = confs["teacher"]["total"]
        for conf in confs.values():
            conf["teacher_equivalent"] = conf["total"] / base
        end_to_end = {
            "cfg50_teacher": 100.0,  # 50 steps x (cond + uncond)
            "cfg50_pruned_routed": 100.0 * confs["pruned_routed"]["teacher_equivalent"],
            "lora4_teacher": 4.0,  # 4 steps, CFG 1: one forward a step
            "lora4_pruned_routed": 4.0 * confs["pruned_routed"]["teacher_equivalent"],
        }
        rows.append({"model": model_name, "resolution": res_name, "frames": frames, "tokens": tokens,
                     "text_tokens": TEXT_TOKENS, "configs": confs, "end_to_end_teacher_forwards": end_to_end})
    return {"head_fraction": config.head_fraction, "ffn_fraction": config.ffn_fraction,
            "routed_budget": config.routed_budget, "rows": rows}


def table(result: dict) -> list[str]:
    lines = [f"Analytic compute per sampling step (one forward, batch 1; TMACs), pruned = "
             f"{result['head_fraction']:.0%} heads / {result['ffn_fraction']:.0%} FFN, routed = budget "
             f"{result['routed_budget']:g}",
             f"{'model':6} {'res':5} {'tokens':>7} {'config':15} {'attn core':>9} {'sa proj':>8} {'cross':>7} "
             f"{'ffn':>7} {'emb+head':>8} {'total':>7} {'x teacher':>9}"]
    for row in result["rows"]:
        for name, c in row["configs"].items():
            p = c["parts"]
            lines.append(f"{row['model']:6} {row['resolution']:5} {row['tokens']:>7} {name:15} "
                         f"{p['attn_core'] / 1e12:>9.2f} {p['self_attn_proj'] / 1e12:>8.2f} "
                         f"{p['cross_attn'] / 1e12:>7.2f} {p['ffn'] / 1e12:>7.2f} {c['embed_head'] / 1e12:>8.3f} "
                         f"{c['total'] / 1e12:>7.2f} {c['teacher_equivalent']:>9.3f}")
    lines.append("End to end, in teacher forwards: CFG 50 steps vs 4-step CFG-free LoRA")
    for row in result["rows"]:
        e = row["end_to_end_teacher_forwards"]
        lines.append(f"  {row['model']:6} {row['resolution']:5} CFG@50: teacher {e['cfg50_teacher']:.0f}, pruned+routed "
                     f"{e['cfg50_pruned_routed']:.1f} | 4-step LoRA: teacher {e['lora4_teacher']:.0f}, pruned+routed "
                     f"{e['lora4_pruned_routed']:.2f}")
    return lines
