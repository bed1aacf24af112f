"""Real users' files through a real ComfyUI: every release layout, fp8_scaled end to end, lightx2v LoRAs.

The files carry the real key names of each release (``layouts.py``) at reduced size, with head dim 128 and text dim
4096 and no PARE metadata where the stock loader has to read them. References:
- the stock ``UNETLoader`` on the same file where it can read it (original, ``model.diffusion_model.`` prefix,
  fp8_scaled), else on the original-layout file holding the same tensors (shards, ``diffusion_model.`` prefix,
  diffusers): bit-identical latents;
- a pruned fp8_scaled student against the stock loader on the scaled teacher with the pruned heads and neurons
  zeroed (fp8 zeros are exact; the q/k norm weights are rescaled in bf16, which rounds, hence the 1e-3 of the
  latent std the issue allows);
- a lightx2v-style LoRA (``diff_m``, 5-D ``patch_embedding.diff``) against the student merged by hand in fp32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_latent
from graphs import pare_loader, sample_graph, stock_loader
from helpers import STOCK_I2V, STOCK_T2V, write_conditioning_pair, write_plan, zeroed_teacher
from layouts import dequantize, scale_to_fp8, to_diffusers, to_per_layer, write_original, write_sharded
from lora_files import make_lora, write_lora

from comfyui_pare.__main__ import main
from comfyui_pare.pruned import save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan_reader import open_wan
from training.tiny import random_wan_state_dict

pytestmark = [pytest.mark.comfy, pytest.mark.every_comfyui]
POS, NEG = "rel_cond4096_pos.safetensors", "rel_cond4096_neg.safetensors"
D = STOCK_T2V  # dim 512, 4 heads of 128, FFN 384, 3 blocks, text dim 4096
# Block 0 keeps FFN 192 (a multiple of 16); blocks 1 and 2 keep 200, which fp8 matmuls cannot take.
PLAN = [{"heads": [0, 2], "ffn": list(range(0, 384, 2))}, {"heads": [3], "ffn": list(range(100, 300))},
        {"heads": [1, 2, 3], "ffn": list(range(200))}]
SHARD = "rel_sharded/diffusion_pytorch_model-00002-of-00003.safetensors"
PER_LAYER_FILES = {"rel_per_layer": False, "rel_per_layer_header": True}


def cli(*args: str) -> None:
    assert main(list(args)) == 0  # the CLI's own entry point, in this process (no second torch import)


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    work = tmp_path_factory.mktemp("release")
    dm = comfy.base / "models" / "diffusion_models"
    write_conditioning_pair(comfy.base / "input", POS, NEG, 4096)
    teacher = random_wan_state_dict(D, seed=11)
    write_original(dm / "rel_original.safetensors", teacher)
    write_original(dm / "rel_prefixed.safetensors", teacher, prefix="model.diffusion_model.")
    write_original(dm / "rel_dm_prefixed.safetensors", teacher, prefix="diffusion_model.")
    write_sharded(dm / "rel_sharded", teacher)
    write_original(dm / "rel_diffusers" / "diffusion_pytorch_model.safetensors", to_diffusers(teacher))
    scaled = scale_to_fp8(teacher)
    write_original(dm / "rel_scaled.safetensors", scaled)
    write_original(dm / "rel_scaled_dequantized.safetensors", dequantize(scaled))
    write_original(dm / "rel_i2v_scaled.safetensors", scale_to_fp8(random_wan_state_dict(STOCK_I2V, seed=12)))
    plan = write_plan(work / "plan.json", PLAN)
    cli("prune", "--no-align", "--teacher", str(dm / "rel_scaled.safetensors"), "--plan", str(plan),
        "--out", str(dm / "rel_scaled_student.safetensors"))
    cli("prune", "--no-align", "--teacher", str(dm / "rel_sharded"), "--plan", str(plan), "--out", str(dm / "rel_student.safetensors"))
    for name, in_header in PER_LAYER_FILES.items():  # ComfyUI 0.8's per-layer fp8 layout, configs as tensors / header
        sd, metadata = to_per_layer(scaled, in_header)
        save_atomic(dm / f"{name}.safetensors", sd, metadata)
        cli("prune", "--no-align", "--teacher", str(dm / f"{name}.safetensors"), "--plan", str(plan),
            "--out", str(dm / f"{name}_student.safetensors"))
    return {"dm": dm, "work": work, "teacher": teacher, "scaled": scaled}


def latent(comfy, loader, **kw) -> torch.Tensor:
    kw = {"cfg": 4.0, "steps": 1, "seed": 17, "shift": 3.0, **kw}
    g, save = sample_graph(loader, positive=POS, negative=NEG, **kw)
    return run_latent(comfy, g, save)


@pytest.mark.parametrize("name,stock_name,seed", [
    ("rel_original.safetensors", "rel_original.safetensors", 1),
    ("rel_prefixed.safetensors", "rel_prefixed.safetensors", 2),
    ("rel_dm_prefixed.safetensors", "rel_original.safetensors", 3),  # stock cannot read this prefix
    (SHARD, "rel_original.safetensors", 4),  # any shard: the whole release, via its index
    ("rel_diffusers/diffusion_pytorch_model.safetensors", "rel_original.safetensors", 5),  # stock: no diffusers Wan
])
def test_every_layout_loads_and_samples_as_the_stock_loader(comfy, files, name, stock_name, seed):
    ours = latent(comfy, pare_loader(name), seed=seed)
    assert torch.equal(ours, latent(comfy, stock_loader(stock_name), seed=seed))


@pytest.mark.parametrize("name,weight_dtype,variant", [
    ("rel_scaled.safetensors", "default", "t2v"),
    ("rel_scaled.safetensors", "fp8_e4m3fn_fast", "t2v"),
    ("rel_i2v_scaled.safetensors", "default", "i2v"),
])
def test_fp8_scaled_file_is_bit_identical_to_the_stock_loader(comfy, files, name, weight_dtype, variant):
    kw = {"variant": variant}
    ours = latent(comfy, pare_loader(name, weight_dtype), **kw)
    stock = latent(comfy, stock_loader(name, weight_dtype), **kw)
    assert torch.equal(ours, stock)
    if variant == "t2v" and weight_dtype == "default":
        # The scales were applied (without them the fp8 values are up to 448 / max|w| times too large): the
        # dequantized teacher in fp32 samples to nearly the same latent; the rest is the scaled model's
        # lower-precision compute (ComfyUI picks the dtype for scaled files itself).
        dequantized = latent(comfy, stock_loader("rel_scaled_dequantized.safetensors"))
        assert float((ours - dequantized).abs().max()) < 0.02 * float(dequantized.std())


def test_pruned_fp8_scaled_student_equals_stock_loader_on_zeroed_teacher(comfy, files):
    with open_wan(files["dm"] / "rel_scaled_student.safetensors") as r:
        assert r.scaled_fp8 and r.layout == "original" and r.meta.blocks[1].heads == (3,)
        assert r.tensor("blocks.1.self_attn.q.weight").dtype == torch.float8_e4m3fn
    # fp8 zeros are exact; the q/k norm weights are rescaled in bf16 here, which rounds.
    zeroed = zeroed_teacher(files["scaled"], PLAN, D.head_dim, D.num_heads, D.ffn_dim)
    write_original(files["dm"] / "rel_scaled_zeroed.safetensors", zeroed)
    ours = latent(comfy, pare_loader("rel_scaled_student.safetensors"))
    ref = latent(comfy, stock_loader("rel_scaled_zeroed.safetensors"))
    unpruned = latent(comfy, stock_loader("rel_scaled.safetensors"))
    std = float(ref.std())
    assert float((ref - unpruned).abs().max()) > 0.05 * std, "pruning must change the output for this to mean much"
    err = float((ours - ref).abs().max())
    assert err < 1e-3 * std, f"max |student - zeroed teacher| = {err:.2e}, latent std {std:.3f}"


def _stock_reads_per_layer(comfyui_version: str) -> bool:
    return comfyui_version != "0.3.75"  # 0.8 and later convert and read ComfyUI's per-layer fp8 layout


@pytest.mark.parametrize("name", list(PER_LAYER_FILES))
def test_per_layer_fp8_teacher_and_student_equal_the_stock_loader(comfy, files, comfyui_version, name):
    """ComfyUI 0.8's per-layer layout (``weight_scale`` + ``.comfy_quant``, or the ``_quantization_metadata`` header):
    the teacher samples bit-identically to the stock loader, and its pruned student (pruned in that layout) equals
    the stock loader on the zeroed teacher in that layout. ComfyUI 0.3.75 cannot read the layout itself: there the
    pack hands it the same weights in its marker layout, and the references are the marker-layout files."""
    with open_wan(files["dm"] / f"{name}_student.safetensors") as r:
        assert r.quant_layout == "per-layer" and r.meta.blocks[1].heads == (3,)
        assert r.tensor("blocks.1.self_attn.q.weight").dtype == torch.float8_e4m3fn
    ours_teacher = latent(comfy, pare_loader(f"{name}.safetensors"))
    zeroed = zeroed_teacher(files["scaled"], PLAN, D.head_dim, D.num_heads, D.ffn_dim)
    if _stock_reads_per_layer(comfyui_version):
        sd, metadata = to_per_layer(zeroed, PER_LAYER_FILES[name])
        save_atomic(files["dm"] / f"{name}_zeroed.safetensors", sd, metadata)
        stock_teacher, stock_zeroed = f"{name}.safetensors", f"{name}_zeroed.safetensors"
    else:
        write_original(files["dm"] / "rel_scaled_zeroed.safetensors", zeroed)
        stock_teacher, stock_zeroed = "rel_scaled.safetensors", "rel_scaled_zeroed.safetensors"
    assert torch.equal(ours_teacher, latent(comfy, stock_loader(stock_teacher)))
    ours = latent(comfy, pare_loader(f"{name}_student.safetensors"))
    ref = latent(comfy, stock_loader(stock_zeroed))
    std = float(ref.std())
    assert float((ref - ours_teacher).abs().max()) > 0.05 * std, "pruning must change the output"
    err = float((ours - ref).abs().max())
    assert err < 1e-3 * std, f"max |student - zeroed teacher| = {err:.2e}, latent std {std:.3f}"


def test_lora_loader_patches_a_scaled_student_as_stock_comfyui_does(comfy, files):
    """Our node (teacher LoRA, sliced on the fly) equals the stock LoRA loader with the CLI-sliced file, on the
    fp8_scaled student: ComfyUI dequantizes, adds and re-quantizes the same way for both."""
    loras = comfy.base / "models" / "loras"
    name = write_lora(loras / "rel_teacher_lora.safetensors", make_lora(D, seed=21, modulation=False))
    cli("lora-slice", "--model", str(files["dm"] / "rel_scaled_student.safetensors"), "--lora", str(loras / name),
        "--out", str(loras / "rel_sliced_lora.safetensors"))
    student = pare_loader("rel_scaled_student.safetensors")
    base = latent(comfy, student)
    ours = latent(comfy, student, model_patches=[("PARELoraLoader", {"lora_name": name, "strength_model": 0.7})])
    stock = latent(comfy, student, model_patches=[("LoraLoaderModelOnly", {"lora_name": "rel_sliced_lora.safetensors",
                                                                           "strength_model": 0.7})])
    assert not torch.allclose(ours, base, atol=1e-3)
    assert torch.equal(ours, stock)


def _lightx2v_lora(seed: int) -> dict[str, torch.Tensor]:
    """The key spelling of lightx2v's released distill LoRAs: ``blocks.N.diff_m`` / ``head.diff_m`` (modulation
    deltas), a 5-D ``patch_embedding.diff`` and ``.diff_b``, and low-rank pairs with alpha (dyadic, so exact)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {f"diffusion_model.blocks.{i}.diff_m": 0.05 * torch.randn(1, 6, D.dim, generator=gen)
          for i in range(D.num_layers)}
    sd["diffusion_model.head.diff_m"] = 0.05 * torch.randn(1, 2, D.dim, generator=gen)
    sd["diffusion_model.patch_embedding.diff"] = 0.02 * torch.randn(D.dim, D.in_dim, 1, 2, 2, generator=gen)
    sd["diffusion_model.patch_embedding.diff_b"] = 0.02 * torch.randn(D.dim, generator=gen)
    for i in range(D.num_layers):
        for n in ("cross_attn.q", "cross_attn.o"):
            sd[f"diffusion_model.blocks.{i}.{n}.lora_down.weight"] = torch.randint(-8, 9, (4, D.dim), generator=gen) / 128
            sd[f"diffusion_model.blocks.{i}.{n}.lora_up.weight"] = torch.randint(-8, 9, (D.dim, 4), generator=gen) / 128
            sd[f"diffusion_model.blocks.{i}.{n}.alpha"] = torch.tensor(8.0)
    return sd


def test_lightx2v_lora_diff_m_changes_the_modulation_and_equals_hand_merged(comfy, files):
    loras, strength = comfy.base / "models" / "loras", 0.5
    lora = _lightx2v_lora(seed=31)
    save_atomic(loras / "rel_lightx2v.safetensors", lora, {"format": "pt"})
    no_mod = {k: v for k, v in lora.items() if not k.endswith("diff_m")}
    save_atomic(loras / "rel_lightx2v_no_diff_m.safetensors", no_mod, {"format": "pt"})
    with open_wan(files["dm"] / "rel_student.safetensors") as r:
        sd, meta = r.state_dict(), r.meta
    for key, t in lora.items():  # the merge by hand, in fp32
        name = key.removeprefix("diffusion_model.")
        if name.endswith(".diff_m"):
            target = name.removesuffix("diff_m") + "modulation"
            sd[target] = sd[target] + strength * t
        elif name.endswith((".diff", ".diff_b")):
            base, part = name.rsplit(".", 1)
            target = f"{base}.{'weight' if part == 'diff' else 'bias'}"
            sd[target] = sd[target] + strength * t
        elif name.endswith(".lora_up.weight"):
            base = name.removesuffix(".lora_up.weight")
            down = lora[f"diffusion_model.{base}.lora_down.weight"]
            sd[f"{base}.weight"] = sd[f"{base}.weight"] + strength * (8.0 / 4) * (t @ down)
    save_checkpoint(files["dm"] / "rel_student_lightx2v_merged.safetensors", sd, meta)

    student = pare_loader("rel_student.safetensors")
    ours = latent(comfy, student, model_patches=[("PARELoraLoader", {"lora_name": "rel_lightx2v.safetensors",
                                                                     "strength_model": strength})])
    merged = latent(comfy, pare_loader("rel_student_lightx2v_merged.safetensors"))
    without_diff_m = latent(comfy, student, model_patches=[
        ("PARELoraLoader", {"lora_name": "rel_lightx2v_no_diff_m.safetensors", "strength_model": strength})])
    assert not torch.allclose(ours, without_diff_m, atol=1e-3), "the diff_m modulation deltas must be applied"
    torch.testing.assert_close(ours, merged, rtol=1e-6, atol=1e-6)
    skipped = [ln for ln in comfy.log_text().splitlines() if "rel_lightx2v" in ln and "not applied" in ln]
    assert not skipped, skipped


def test_fp8_matmuls_get_padded_widths(comfy, files):
    """FFN width 200 is not a multiple of 16 (fp8 matmuls) nor of 64 (tensor cores): the loader pads it to 256, for
    fp8_e4m3fn_fast and for a scaled file whose marker turns fp8 matmuls on, so the width warning never fires."""
    def lines_for(name: str, text: str) -> list[str]:
        return [ln for ln in comfy.log_text().splitlines() if text in ln and name in ln]

    for name, dtype, seed in (("rel_student.safetensors", "fp8_e4m3fn_fast", 42),
                              ("rel_scaled_student.safetensors", "default", 43)):
        assert torch.isfinite(latent(comfy, pare_loader(name, dtype), steps=1, seed=seed)).all()
        padded = lines_for(name, "zero-padded")
        assert padded and "1: heads 1->1, ffn 200->256" in padded[-1] and "2: heads 3->3, ffn 200->256" in padded[-1]
        assert not lines_for(name, "not multiples of 16")
