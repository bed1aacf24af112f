"""The bench: its analytic compute model against torch's own FLOP counter, and `bench --quick` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.models import pruned_meta
from comfyui_pare.compute import embed_head_macs, model_block_macs
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import WanDims
from training.model import WanTransformer
from training.tiny import TINY_T2V

WIDTH_1_3B = WanDims(dim=1536, num_heads=12, ffn_dim=8960, num_layers=2, text_dim=4096)


def _flops_per_module(meta: PrunedWanMeta, latent: tuple[int, int, int], text_tokens: int) -> dict[str, int]:
    """torch's FlopCounterMode on one forward of the reference Wan (meta tensors: shapes only, no compute)."""
    with torch.device("meta"):
        model = WanTransformer(meta)
        x = torch.zeros(1, meta.dims.in_dim, *latent)
        ctx = torch.zeros(1, text_tokens, meta.dims.text_dim)
        t = torch.zeros(1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, ctx)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("dims", [TINY_T2V, WIDTH_1_3B], ids=["tiny", "1.3B-width"])
@pytest.mark.parametrize("pruned", [False, True], ids=["teacher", "pruned"])
def test_analytic_compute_matches_torch_flop_counter(dims, pruned):
    meta = pruned_meta(dims, 0.5, 0.7) if pruned else PrunedWanMeta.teacher(dims)
    latent, text_tokens = (3, 16, 16), 24
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    flops = _flops_per_module(meta, latent, text_tokens)
    blocks = model_block_macs(meta, tokens, text_tokens)
    for i, b in enumerate(blocks):  # per part: FLOPs are 2 x MACs
        for module, macs in ((f"blocks.{i}.self_attn", b.self_attn_proj + b.attn_core),
                             (f"blocks.{i}.cross_attn", b.cross_attn), (f"blocks.{i}.ffn", b.ffn)):
            counted = flops[f"WanTransformer.{module}"] / 2
            assert counted == pytest.approx(macs, rel=0.02), module
    total = sum(b.total for b in blocks) + embed_head_macs(meta.dims, tokens, text_tokens)
    assert flops["Global"] / 2 == pytest.approx(total, rel=0.02)


@pytest.mark.comfy  # the measured suite imports the pinned ComfyUI
def test_bench_quick_writes_its_schema(tmp_path):
    """`python -m benchmarks --quick`: the real verb, the real ComfyUI sampler (narrow model, seconds)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Measured through ComfyUI's KSampler" in proc.stdout and "Analytic compute" in proc.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["schema"] == "pare-bench/1" and set(result["suites"]) == {"compute", "measured"}
    assert result["config"]["quick"] is True

    compute = result["suites"]["compute"]
    assert {(r["model"], r["resolution"]) for r in compute["rows"]} == {
        (m, r) for m in ("1.3B", "14B") for r in ("480p", "720p")} | {("5B", "720p")}
    five = next(r for r in compute["rows"] if r["model"] == "5B")
    assert (five["frames"], five["tokens"]) == (121, 31 * 22 * 40)  # 1280x704 through the 16x VAE
    for row in compute["rows"]:
        c = row["configs"]
        assert set(c) == {"teacher", "pruned", "pruned_routed", "teacher_routed"}
        assert set(c["teacher"]["parts"]) == {"self_attn_proj", "attn_core", "cross_attn", "ffn"}
        assert c["pruned_routed"]["total"] < c["pruned"]["total"] < c["teacher"]["total"]
        wan21_tokens = {"480p": 32760, "720p": 75600}[row["resolution"]]  # 81 frames through Wan2.1's 8x VAE
        assert row["tokens"] == (31 * 22 * 40 if row["model"] == "5B" else wan21_tokens)
        e = row["end_to_end_teacher_forwards"]
        assert e["cfg50_teacher"] == 100 and e["lora4_teacher"] == 4
        assert e["lora4_pruned_routed"] < e["lora4_teacher"]

    measured = result["suites"]["measured"]
    names = ["teacher_stock", "teacher_pare", "pruned", "pruned_b1", "pruned_b0.75", "pruned_b0.5", "teacher_b0.5"]
    assert list(measured["candidates"]) == names
    for name, c in measured["candidates"].items():
        s = c["step_seconds"]
        assert s["n"] == result["config"]["repeats"] and 0 < s["min"] <= s["median"] <= s["max"], name
        assert c["speedup_vs_teacher"]["n"] == s["n"] and c["analytic_speedup"] > 0 and c["weights_bytes"] > 0
    cands = measured["candidates"]
    assert cands["pruned_b0.5"]["macs_per_forward"] < cands["pruned"]["macs_per_forward"] \
        < cands["teacher_stock"]["macs_per_forward"] == cands["teacher_pare"]["macs_per_forward"]
    # The routed runs really executed what the decision set says (read from the routing records).
    assert [c["executed_fraction"] for c in measured["budget_curve"]] == pytest.approx([1.0, 0.75, 0.5])
    assert cands["teacher_b0.5"]["executed_fraction"] == pytest.approx(0.5)
    assert 0 < measured["checkpoint_size_ratio"] < 1
    assert measured["router_overhead"]["decision_seconds"]["median"] > 0
    with Image.open(tmp_path / "bench.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.parametrize("argv,blocks,tokens", [
    (["--device", "cuda"], 30, 32760),
    (["--device", "cuda", "--model", "14b"], 8, 32760),
    (["--device", "cuda", "--model", "14b", "--resolution", "720p"], 8, 75600),
    (["--device", "cuda", "--model", "14b", "--quick"], 2, 32760),
], ids=["1.3b", "14b", "14b-720p", "14b-quick"])
def test_gpu_profiles_measure_the_widths_users_get(argv, blocks, tokens):
    """The GPU configs (no GPU needed to build them): real widths, aligned student plans, sized for a 24 GB card."""
    from benchmarks.runner import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(argv))
    assert config.device == "cuda" and config.dims.num_layers == blocks and config.shape.tokens == tokens
    meta = pruned_meta(config.dims, config.head_fraction, config.ffn_fraction)
    assert all(b.ffn_dim % 64 == 0 and (b.num_heads * config.dims.head_dim) % 64 == 0 for b in meta.blocks)
    if config.model == "14b":
        assert (config.dims.dim, config.dims.num_heads, config.dims.ffn_dim) == (5120, 40, 13824)
        assert meta.blocks[0].ffn_dim == 9728  # 70% of 13824 = 9677, rounded up to the grain as prune does
        teacher_bytes = 2 * sum(math.prod(s) for s in PrunedWanMeta.teacher(config.dims).expected_shapes().values())
        student_bytes = 2 * sum(math.prod(s) for s in meta.expected_shapes().values())
        assert teacher_bytes + student_bytes < 12e9  # bf16 weights leave room for a 720p step on 24 GB
