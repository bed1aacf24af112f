"""Tensor-core alignment (comfyui_pare.alignment): zero padding at load computes the same function, in every
storage dtype, LoRAs cut to the stored widths still merge to the same model, and plans round up to the grain."""

from __future__ import annotations

import math

import pytest
import torch
from lora_files import random_lora, write_style

from comfyui_pare.alignment import (
    TENSOR_CORE_MULTIPLE,
    align_plan,
    alignment_plan,
    describe_alignment,
    head_grain,
    pad_lora,
    pad_state_dict,
)
from comfyui_pare.lora import merged_deltas, parse_lora, slice_lora
from comfyui_pare.pruned import FP8_MATMUL_MULTIPLE, PrunedWanMeta, unaligned_widths
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.wan import WanDims
from training.model import WanTransformer
from training.tiny import TINY_I2V, TINY_T2V, random_wan_state_dict

FP32_TOL = 2e-5  # outputs are O(1-5): a few fp32 ulps of difference, from the rescaled q/k rows and summation order
GRAIN = TENSOR_CORE_MULTIPLE
# Odd head counts (head dim 32: 3 heads = 96 channels, 5 = 160, 7 = 224) and FFN widths off the grain.
PLAN = (BlockPlan(heads=(0, 2, 5), ffn=tuple(range(0, 512, 3))), BlockPlan(heads=(1, 2, 3, 4, 6), ffn=tuple(range(100))),
        BlockPlan(heads=(7,), ffn=(5, 9, 300)), BlockPlan(), BlockPlan(heads=(0, 1, 2, 3, 4, 5, 6)),
        BlockPlan(heads=(0, 4), ffn=tuple(range(448))))


def student(dims: WanDims, dtype: torch.dtype = torch.float32) -> tuple[dict, PrunedWanMeta]:
    sd = random_wan_state_dict(dims, seed=4)
    out, meta = prune_state_dict(sd, PrunedWanMeta.teacher(dims), PrunePlan(PLAN))
    return {k: v.to(dtype) for k, v in out.items()}, meta


def inputs(dims: WanDims, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dims.in_dim, 3, 6, 8, generator=g)
    ctx = torch.randn(batch, 12, dims.text_dim, generator=g)
    clip = torch.randn(batch, 257, 1280, generator=g) if dims.variant == "i2v" else None
    return x, torch.linspace(950.0, 120.0, batch), ctx, clip


@torch.no_grad()
def forward(sd: dict, meta: PrunedWanMeta, dims: WanDims) -> torch.Tensor:
    x, t, ctx, clip = inputs(dims)
    model = WanTransformer.from_state_dict({k: v.float() for k, v in sd.items()}, meta, dtype=torch.float32)
    return model(x, t, ctx, clip_fea=clip)


@pytest.mark.parametrize("dims", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_padding_is_exact_and_on_the_grain(dims):
    sd, meta = student(dims)
    assert unaligned_widths(meta, GRAIN)  # the student really is off the grain
    padded, built = pad_state_dict(sd, meta)
    assert not unaligned_widths(built, GRAIN) and not unaligned_widths(built, FP8_MATMUL_MULTIPLE)
    assert [b.num_heads for b in built.blocks] == [4, 6, 2, 8, 8, 2]
    assert [b.ffn_dim for b in built.blocks] == [192, 128, 64, 512, 512, 448]
    for key, shape in built.expected_shapes().items():
        assert tuple(padded[key].shape) == shape, key
    err = (forward(padded, built, dims) - forward(sd, meta, dims)).abs().max().item()
    assert err < FP32_TOL, err
    # The scaled q/k rows are what keep the whole-width RMSNorm exact: without them the output moves.
    s = alignment_plan(meta)[0].head_scale
    wrong = dict(padded)
    for n in ("q", "k"):
        wrong[f"blocks.0.self_attn.{n}.weight"] = padded[f"blocks.0.self_attn.{n}.weight"] / s
        wrong[f"blocks.0.self_attn.{n}.bias"] = padded[f"blocks.0.self_attn.{n}.bias"] / s
        wrong[f"blocks.0.self_attn.norm_{n}.weight"] = padded[f"blocks.0.self_attn.norm_{n}.weight"] * s
    assert (forward(wrong, built, dims) - forward(sd, meta, dims)).abs().max() > 1e-3


def test_ffn_padding_adds_only_zeros_in_low_precision():
    sd, meta = student(TINY_T2V, torch.bfloat16)
    padded, built = pad_state_dict(sd, meta)
    f = meta.blocks[1].ffn_dim
    for key, dim in (("ffn.0.weight", 0), ("ffn.0.bias", 0), ("ffn.2.weight", 1)):
        t, p = sd[f"blocks.1.{key}"], padded[f"blocks.1.{key}"]
        assert p.dtype == torch.bfloat16 and torch.equal(p.narrow(dim, 0, f), t)
        assert not p.narrow(dim, f, p.shape[dim] - f).any()
    assert padded["blocks.3.ffn.0.weight"] is sd["blocks.3.ffn.0.weight"]  # aligned tensors are shared, not copied


LAYOUTS = {"marker": ("scale_weight", "scale_input"), "per-layer": ("weight_scale", "input_scale")}


def fp8_scaled(sd: dict, layout: str = "marker") -> dict:
    """ComfyUI's scaled fp8 layouts: fp8 linear weights with a 0-d fp32 weight scale (and input scale) each, named
    as the marker layout (0.3.x) or the per-layer one (0.8+, which also has .comfy_quant configs) names them."""
    weight_scale, input_scale = LAYOUTS[layout]
    out = dict(sd)
    for key, t in sd.items():
        if key.endswith(".weight") and t.ndim == 2 and key.startswith("blocks."):
            scale = t.abs().max().float() / 448.0
            out[key] = (t / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + weight_scale] = scale.reshape(())
            out[key[: -len("weight")] + input_scale] = torch.tensor(1.0)
    return out


def dequantized(sd: dict, layout: str = "marker") -> dict:
    weight_scale, input_scale = LAYOUTS[layout]
    out = {k: v for k, v in sd.items() if not k.endswith((weight_scale, input_scale))}
    for key in out:
        scale = sd.get(key[: -len("weight")] + weight_scale) if key.endswith(".weight") else None
        if scale is not None:
            out[key] = out[key].float() * scale
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_scaled_pads_exactly_without_touching_fp8_bytes(layout):
    sd, meta = student(TINY_T2V)
    scaled = fp8_scaled(sd, layout)
    weight_scale = LAYOUTS[layout][0]
    padded, built = pad_state_dict(scaled, meta)
    assert not unaligned_widths(built, GRAIN)
    q = padded["blocks.0.self_attn.q.weight"]
    assert q.dtype == torch.float8_e4m3fn
    rows = scaled["blocks.0.self_attn.q.weight"].shape[0]
    assert torch.equal(q[:rows].view(torch.uint8), scaled["blocks.0.self_attn.q.weight"].view(torch.uint8))
    assert not q[rows:].view(torch.uint8).any()
    s = alignment_plan(meta)[0].head_scale
    assert padded[f"blocks.0.self_attn.q.{weight_scale}"].item() == pytest.approx(
        scaled[f"blocks.0.self_attn.q.{weight_scale}"].item() * s, rel=1e-7)
    err = (forward(dequantized(padded, layout), built, TINY_T2V)
           - forward(dequantized(scaled, layout), meta, TINY_T2V)).abs().max()
    assert err < FP32_TOL, err


def test_unscaled_fp8_keeps_its_heads_but_pads_the_ffn(caplog):
    sd, meta = student(TINY_T2V)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") and v.ndim == 2 else v) for k, v in sd.items()}
    padded, built = pad_state_dict(fp8, meta, source="plain_fp8.safetensors")
    assert [b.num_heads for b in built.blocks] == [b.num_heads for b in meta.blocks]
    assert all(b.ffn_dim % GRAIN == 0 for b in built.blocks)
    assert "plain_fp8.safetensors" in caplog.text and "cannot be rescaled exactly" in caplog.text


def test_aligned_model_is_returned_unchanged():
    sd = random_wan_state_dict(TINY_T2V, seed=0)
    meta = PrunedWanMeta.teacher(TINY_T2V)
    assert pad_state_dict(sd, meta) == (sd, meta)
    assert describe_alignment(meta)["aligned"] and describe_alignment(meta)["padded_blocks"] == 0


@pytest.mark.parametrize("dims", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_padded_lora_merges_to_the_padded_merged_student(dims):
    """pad(student + sliced LoRA) == pad(student) + pad_lora(sliced LoRA): the LoRA node's patches fit the padded
    model and give the same function as the LoRA on the unpadded student."""
    sd, meta = student(dims)
    parsed = parse_lora(write_style(random_lora(dims), "diffusion_model"), "full.safetensors")
    sliced = slice_lora(parsed, meta)
    delta = merged_deltas(sliced, 1.0, meta.expected_shapes())
    reference, built = pad_state_dict({k: v + delta[k] if k in delta else v for k, v in sd.items()}, meta)
    padded, _ = pad_state_dict(sd, meta)
    shapes = {f"diffusion_model.{k}": tuple(v.shape) for k, v in padded.items()}
    fitted = pad_lora(sliced, meta, shapes, "diffusion_model.")
    padded_delta = merged_deltas(fitted, 1.0, built.expected_shapes())
    for key, want in reference.items():
        got = padded[key] + padded_delta[key] if key in padded_delta else padded[key]
        assert got.shape == want.shape, key
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6, msg=key)
    unpadded = pad_lora(sliced, meta, {f"diffusion_model.{k}": tuple(v.shape) for k, v in sd.items()},
                        "diffusion_model.")
    assert all(unpadded.patches[m] is p for m, p in sliced.patches.items())


def test_align_plan_rounds_up_keeping_every_chosen_index():
    dims = WanDims(dim=256, num_heads=8, ffn_dim=13824, num_layers=2, text_dim=64)
    meta = PrunedWanMeta.teacher(dims)
    chosen_ffn = tuple(j for j in range(13824) if j % 10)[:9677]  # FFN 9677 of 13824
    plan = PrunePlan((BlockPlan(heads=(1, 4, 6), ffn=chosen_ffn), BlockPlan(heads=(0, 1, 2, 3, 4, 5, 6, 7))))
    aligned = align_plan(plan, meta)
    b0 = aligned.blocks[0]
    assert head_grain(dims.head_dim) == 2 and b0.heads == (0, 1, 4, 6)
    assert len(b0.ffn) == 9728 and set(chosen_ffn) <= set(b0.ffn)
    assert set(b0.ffn) - set(chosen_ffn) == set(range(0, 510, 10))  # the lowest-numbered dropped neurons
    assert aligned.blocks[1] == plan.blocks[1]
    assert math.gcd(len(b0.heads) * dims.head_dim, GRAIN) == GRAIN
