"""Tensor-core widths in the real ComfyUI: a student off the grain (FFN 9677 of 13824, odd head counts at head dim
32) loaded by PARE Load Pruned Wan runs at widths that are multiples of 64 and samples the same latents as the
unpadded model (test-only loader PARETestLoadUnpadded: the pack's builder without the padding)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_latent
from graphs import out, pare_loader, sample_graph
from helpers import write_conditioning_pair
from lora_files import random_lora, write_style

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.wan import WanDims
from training.tiny import random_wan_state_dict

pytestmark = [pytest.mark.comfy, pytest.mark.every_comfyui]  # the loader builds the model differently on 0.8
POS, NEG = "align_pos.safetensors", "align_neg.safetensors"
# A narrow stand-in for Wan2.1-14B's FFN (13824) with head dim 32, so head counts can be off the grain too (dim 1024:
# the metadata check allows FFN widths up to 16 x dim).
DIMS = WanDims(dim=1024, num_heads=32, ffn_dim=13824, num_layers=2, text_dim=4096)
PLAN = PrunePlan((BlockPlan(heads=(1, 4, 6), ffn=tuple(j for j in range(13824) if j % 10)[:9677]),
                  BlockPlan(heads=(0, 2, 3, 5, 7), ffn=tuple(range(7, 13824, 13))[:1001])))
STUDENT, LORA = "align_student.safetensors", "align_lora.safetensors"
STUDENT_LORA = "align_student_lora.safetensors"  # trained on the student: the student's own (unpadded) shapes
FP32_TOL = dict(rtol=1e-5, atol=2e-5)  # a few fp32 ulps after 3 sampler steps


@pytest.fixture(scope="module")
def files(comfy):
    write_conditioning_pair(comfy.base / "input", POS, NEG, DIMS.text_dim)
    teacher = random_wan_state_dict(DIMS, seed=7)
    sd, meta = prune_state_dict(teacher, PrunedWanMeta.teacher(DIMS), PLAN)
    assert [b.num_heads * DIMS.head_dim for b in meta.blocks] == [96, 160]
    save_checkpoint(comfy.base / "models" / "diffusion_models" / STUDENT, sd, meta)
    save_atomic(comfy.base / "models" / "loras" / LORA, write_style(random_lora(DIMS, dyadic=False), "diffusion_model"),
                {"format": "pt"})
    gen = torch.Generator().manual_seed(3)
    own = {}
    for module in ("blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.1.self_attn.o", "blocks.0.ffn.0",
                   "blocks.1.ffn.2"):
        rows, cols = sd[f"{module}.weight"].shape
        own[f"diffusion_model.{module}.lora_up.weight"] = 0.1 * torch.randn(rows, 4, generator=gen)
        own[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, cols, generator=gen) / cols**0.5
        own[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    save_atomic(comfy.base / "models" / "loras" / STUDENT_LORA, own, {"format": "pt"})
    return meta


# Token reduction on both blocks, queries and keys/values (the proportional bias): padded heads are zero heads, which
# the per-head matching and the reduced attention carry as zeros.
REDUCTION = {"num_blocks": 2, "stride": [1, 2, 2], "metric": "cosine", "mode": "mean", "seed": 5, "rules": [
    {"feature": "q", "blocks": "0-1", "ratio": 0.5}, {"feature": "kv", "blocks": "0-1", "ratio": 0.4}]}
TOKEN_REDUCTION = ("PARETokenReduction", {"schedule": "custom", "strength": 1.0, "matching_cache_steps": 1,
                                          "start_percent": 0.0, "end_percent": 1.0,
                                          "schedule_json": json.dumps(REDUCTION)})


def sample(comfy, loader, patches: list[tuple[str, dict]]) -> tuple[torch.Tensor, list[dict]]:
    probe = {}

    def patch(g, model):
        for node, inputs in patches:
            model = g.add(node, model=out(model), **inputs)
        probe["node"] = g.add("PARETestModelWidths", model=out(model))
        return model

    g, save = sample_graph(loader, positive=POS, negative=NEG, cfg=4.0, steps=3, seed=5, size=64, frames=5,
                           patch_model=patch)
    entry = comfy.run(g.to_json())
    return read_latent(comfy.output_files(entry, save, "latents")[0]), json.loads(entry["outputs"][probe["node"]]["text"][0])


def lora(node: str, name: str) -> tuple[str, dict]:
    return node, {"lora_name": name, "strength_model": 0.05}  # random LoRAs: larger strengths make the model chaotic


@pytest.mark.parametrize("extra", [None, "teacher_lora", "student_lora", "token_reduction"])
def test_off_grain_student_runs_on_the_grain_and_samples_the_same(comfy, files, extra):
    """Extras on both models: a teacher LoRA through PARE LoRA Loader; a LoRA trained on the student (its own shapes)
    through PARE LoRA Loader on the padded model and the stock loader on the unpadded reference; token reduction."""
    ours_patches = {None: [], "teacher_lora": [lora("PARELoraLoader", LORA)],
                    "student_lora": [lora("PARELoraLoader", STUDENT_LORA)], "token_reduction": [TOKEN_REDUCTION]}[extra]
    ref_patches = [lora("LoraLoaderModelOnly", STUDENT_LORA)] if extra == "student_lora" else ours_patches
    ours, widths = sample(comfy, pare_loader(STUDENT), ours_patches)
    ref, ref_widths = sample(comfy, ("PARETestLoadUnpadded", {"unet_name": STUDENT}), ref_patches)
    assert ref_widths == [{"self_attention": 96, "heads": 3, "ffn": 9677}, {"self_attention": 160, "heads": 5, "ffn": 1001}]
    assert widths == [{"self_attention": 128, "heads": 4, "ffn": 9728}, {"self_attention": 192, "heads": 6, "ffn": 1024}]
    assert torch.isfinite(ours).all() and ours.abs().sum() > 0
    torch.testing.assert_close(ours, ref, **FP32_TOL)
