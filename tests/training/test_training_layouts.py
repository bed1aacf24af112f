"""Every teacher layout users download gives the same calibration stats and the same student, bit for bit.

The teachers are written with each release's real key names (``layouts.py``) at reduced size; ``calibrate`` and
``prune`` read them through the one reader (``comfyui_pare.wan_reader`` via ``training.teacher``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from layouts import T2V, dequantize, scale_to_fp8, write_layout
from safetensors import safe_open
from training_helpers import write_samples

from comfyui_pare.wan import WanDims
from training.__main__ import main
from training.tiny import random_wan_state_dict

I2V = WanDims(dim=256, num_heads=2, ffn_dim=128, num_layers=2, text_dim=32, in_dim=36, variant="i2v")


def _raw(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (what, k)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Stats are float sums: BLAS may round the last bit differently for differently aligned buffers."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=f"{what}: {k}")


def _pipeline(teacher: Path, samples: Path, out: Path) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    stats = out / "stats.safetensors"
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out", str(stats),
                 "--sigmas", "0.9,0.4", "--query-rows", "8", "--device", "cpu"]) == 0
    student = out / "student.safetensors"
    assert main(["prune", "--teacher", str(teacher), "--stats", str(stats), "--heads", "0.5", "--ffn", "0.5",
                 "--ffn-multiple", "16", "--out", str(student)]) == 0
    return _raw(stats), _raw(student)


@pytest.mark.parametrize("dims", [T2V, I2V], ids=["t2v", "i2v"])
def test_every_layout_gives_the_same_student_bit_for_bit(dims, tmp_path):
    samples = write_samples(tmp_path / "samples", 1, text_dim=dims.text_dim, latent_shape=[16, 2, 4, 4])
    if dims.variant == "i2v":  # I2V samples carry CLIP vision features
        from comfyui_pare.calibration import read_sample, write_sample

        s = read_sample(samples / "s00.safetensors")
        write_sample(samples / "s00.safetensors", s.context, latent_shape=s.latent_shape, seed=s.seed,
                     clip_fea=torch.randn(257, 1280), latent=s.latent)
    sd = random_wan_state_dict(dims, seed=3, dtype=torch.bfloat16)
    ref_stats, ref_student = _pipeline(write_layout("original", tmp_path / "ref", sd), samples, tmp_path / "ref-out")
    assert ref_student["blocks.0.ffn.0.weight"].shape == (64, 256) and ref_student["blocks.0.ffn.0.weight"].dtype \
        == torch.bfloat16
    kinds = ["model.diffusion_model.", "diffusion_model.", "sharded", "diffusers-file", "diffusers-folder"]
    for kind in kinds if dims.variant == "t2v" else ["model.diffusion_model.", "diffusers-file"]:
        stats, student = _pipeline(write_layout(kind, tmp_path / kind, sd), samples, tmp_path / f"{kind}-out")
        _close(stats, ref_stats, kind)
        _same(student, ref_student, kind)

    # fp8_scaled: read dequantized (weight x scale_weight), so it equals the plain file of the same real weights.
    scaled = scale_to_fp8(sd)
    plain_stats, plain_student = _pipeline(write_layout("original", tmp_path / "deq", dequantize(scaled)), samples,
                                           tmp_path / "deq-out")
    for kind in ("original", "model.diffusion_model.", "sharded"):
        stats, student = _pipeline(write_layout(kind, tmp_path / f"fp8-{kind}", scaled), samples,
                                   tmp_path / f"fp8-{kind}-out")
        _close(stats, plain_stats, f"fp8 {kind}")
        _same(student, plain_student, f"fp8 {kind}")
