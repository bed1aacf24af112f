"""``python -m training estimate``: its parameter counts are the model's, its activation model is within 15% of
what autograd really keeps for a block, and it answers the 14B question (8 x 80 GB) the README quotes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import WAN21_14B, WanDims
from training.__main__ import main
from training.estimate import RunShape, activation_values, block_params, memory_per_gpu, uniform_student
from training.model import WanTransformer, rope_freqs

DIMS = WanDims(dim=256, num_heads=4, ffn_dim=1024, num_layers=2, text_dim=64)


def _meta_model(meta: PrunedWanMeta) -> WanTransformer:
    with torch.device("meta"):
        return WanTransformer(meta)


def test_parameter_counts_are_the_models():
    teacher = PrunedWanMeta.teacher(DIMS)
    student = uniform_student(teacher, 0.5, 0.5)
    for meta in (teacher, student):
        model = _meta_model(meta)
        assert block_params(meta) == [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    run = RunShape(gpus=4, gpu_memory_gb=80, tokens=96, ema=True)
    mem = memory_per_gpu(teacher, student, run)
    n_student = sum(p.numel() for p in _meta_model(student).parameters())
    n_teacher = sum(p.numel() for p in _meta_model(teacher).parameters())
    assert mem["student weights (fp32, sharded)"] * 4 == 4 * n_student
    assert mem["AdamW moments (fp32, sharded)"] * 4 == 8 * n_student
    assert mem["EMA of the weights (fp32, sharded)"] * 4 == 4 * n_student
    assert mem["teacher shard (frozen)"] * 4 == 2 * n_teacher


@pytest.mark.parametrize("heads,ffn", [(1.0, 1.0), (0.5, 0.5)])
def test_activation_model_is_within_15_percent_of_what_autograd_keeps(heads, ffn):
    """bf16 block on the CPU: the bytes of every tensor autograd saves for backward (each storage once, the
    parameters and the block's input not counted), against ``activation_values`` x 2 bytes."""
    meta = uniform_student(PrunedWanMeta.teacher(DIMS), heads, ffn)
    model = _meta_model(meta).to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    grid, tokens = (6, 4, 4), 96
    x = torch.randn(1, tokens, DIMS.dim, generator=gen).bfloat16().requires_grad_()
    e, ctx = torch.randn(1, 6, DIMS.dim).bfloat16(), torch.randn(1, 8, DIMS.dim).bfloat16()
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x, e, rope_freqs(grid, DIMS.head_dim), ctx)
    assert math.prod(grid) == tokens
    measured, estimate = sum(saved.values()), 2 * activation_values(meta, 0, tokens)
    assert abs(measured / estimate - 1) < 0.15, (measured, estimate)


def test_14b_on_8_gpus_of_80_gb(capsys):
    """480p (81 frames, 32,760 tokens), one sample per GPU, bf16, checkpointing: fits; without checkpointing the
    activations alone are several GPUs' worth; 720p with EMA does not fit in 80 GB."""
    assert main(["estimate", "--teacher", "wan2.1-14b", "--gpus", "8", "--gpu-memory", "80", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 32760 and r["teacher_params"] == sum(
        p.numel() for p in _meta_model(PrunedWanMeta.teacher(WAN21_14B)).parameters())
    assert r["fits"] and r["memory_gb"]["activations without checkpointing"] > 80
    assert main(["estimate", "--teacher", "wan2.1-14b", "--gpus", "8", "--gpu-memory", "80", "--video",
                 "81x720x1280", "--ema"]) == 0
    assert "fits in 90% of 80 GB: NO" in capsys.readouterr().out


def test_5b_estimate_counts_the_16x_vae_tokens(capsys):
    # Wan2.2 TI2V-5B at its native 121 x 704 x 1280: 31 x 22 x 40 tokens through the 16x VAE (the 8x count is 4x more).
    assert main(["estimate", "--teacher", "wan2.2-ti2v-5b", "--gpus", "8", "--gpu-memory", "80",
                 "--video", "121x704x1280", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 31 * 22 * 40
    assert round(report["teacher_params"] / 1e9, 2) == 5.0 and report["fits"]
