"""A depth-pruned student (teacher blocks removed, VDMini style) through a real ComfyUI: PARE Load Pruned Wan builds
ComfyUI's WanModel with fewer blocks and samples like the training-side model; PARE LoRA Loader applies a teacher
LoRA renumbered to the kept blocks, bit-exact against merging into the teacher first and depth-pruning after.

Why the LoRA comparison is bit-exact: the LoRA's low-rank factors are dyadic (k / 128, |k| <= 8, rank 4) with
alpha / rank a power of two and strength 1, so every delta is exact in fp32 however it is summed, and the .diff /
.diff_b deltas are added as stored; each weight then gets one fp32 add of the same two operands either way.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_latent
from graphs import pare_loader, sample_graph
from safetensors.torch import load_file

from comfyui_pare.lora import load_lora_file, merged_deltas
from comfyui_pare.pruned import save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.surgery import PrunePlan, prune_state_dict
from comfyui_pare.wan_reader import load_checkpoint
from scripts import tiny_assets
from scripts.comfy_harness import PromptError

pytestmark = pytest.mark.comfy
KEEP = [0, 2, 3, 5]  # of the tiny teacher's 6 blocks; teacher block 3 is also width-pruned
PLAN = PrunePlan.from_json({
    "blocks": [{}, {}, {}, {"heads": [1, 2, 5, 6], "ffn": list(range(0, 512, 3))}, {}, {}], "kept_blocks": KEEP})
STUDENT, MERGED = "depth_tiny_student.safetensors", "depth_tiny_merged_then_pruned.safetensors"
LORA = "depth_teacher_lora.safetensors"


def write_dyadic_teacher_lora(path, shapes, seed: int) -> None:
    """Low-rank pairs (with .diff_b) on every block's pruned layers and cross-attention, .diff on modulation."""
    gen = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(6):
        for local in ("self_attn.q", "self_attn.o", "ffn.0", "ffn.2", "cross_attn.v"):
            base, w = f"diffusion_model.blocks.{i}.{local}", shapes[f"blocks.{i}.{local}.weight"]
            t[f"{base}.lora_up.weight"] = torch.randint(-8, 9, (w[0], 4), generator=gen) / 128
            t[f"{base}.lora_down.weight"] = torch.randint(-8, 9, (4, w[1]), generator=gen) / 128
            t[f"{base}.alpha"] = torch.tensor(8.0)
            t[f"{base}.diff_b"] = 0.02 * torch.randn(w[0], generator=gen)
        t[f"diffusion_model.blocks.{i}.modulation.diff"] = 0.05 * torch.randn(1, 6, 256, generator=gen)
    save_atomic(path, t, {"format": "pt"})


@pytest.fixture(scope="module")
def depth_files(comfy, assets_dir):
    dm, loras = comfy.base / "models" / "diffusion_models", comfy.base / "models" / "loras"
    sd, meta = load_checkpoint(assets_dir / tiny_assets.TEACHER_T2V)
    student, student_meta = prune_state_dict(sd, meta, PLAN)
    save_checkpoint(dm / STUDENT, student, student_meta)
    write_dyadic_teacher_lora(loras / LORA, meta.expected_shapes(), seed=11)
    # The outside merge: the teacher LoRA into the teacher's weights, then the same depth + width pruning.
    merged = dict(sd)
    for key, delta in merged_deltas(load_lora_file(loras / LORA)).items():
        merged[key] = sd[key] + delta
    save_checkpoint(dm / MERGED, *prune_state_dict(merged, meta, PLAN))
    return dm


def run(comfy, model: str, loras=(), **kw) -> torch.Tensor:
    kw = {"steps": 3, "cfg": 4.0, "seed": 5, "shift": 3.0, **kw}
    g, save = sample_graph(pare_loader(model), model_patches=list(loras), **kw)
    return run_latent(comfy, g, save)


def test_depth_student_samples_like_the_training_side_model(comfy, depth_files, assets_dir):
    from training.model import WanTransformer
    from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler

    steps, shift, cfg, seed = 4, 3.0, 4.0, 7
    ours = run(comfy, STUDENT, steps=steps, shift=shift, cfg=cfg, seed=seed)
    assert f"PARE: loaded {STUDENT} (original layout, Wan2.1 / Wan2.2-A14B T2V, 4 blocks" in comfy.log_text()
    model = WanTransformer.from_checkpoint(depth_files / STUDENT)
    assert model.num_blocks == 4
    pos = load_file(str(assets_dir / tiny_assets.POSITIVE))["context"][None]
    neg = load_file(str(assets_dir / tiny_assets.NEGATIVE))["context"][None]

    def velocity(x, t, c, f=None):
        with torch.no_grad():
            return model(x, t, c)

    ref = ksampler_euler(velocity, initial_noise(ours.shape, seed), flow_sigmas(steps, shift), Conditioning(pos),
                         Conditioning(neg), cfg=cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    teacher = run(comfy, tiny_assets.TEACHER_T2V, steps=steps, shift=shift, cfg=cfg, seed=seed)
    assert (teacher - ours).abs().max() > 1e-2, "removing blocks must change the output for this to mean anything"


def test_teacher_lora_on_depth_student_equals_merge_then_prune(comfy, depth_files):
    lora = ("PARELoraLoader", {"lora_name": LORA, "strength_model": 1.0})
    before = comfy.log_text().count("the depth-pruned student removed those blocks")
    ours = run(comfy, STUDENT, [lora])
    reference = run(comfy, MERGED)
    assert (ours - run(comfy, STUDENT)).abs().max() > 1e-3, "the LoRA must change the output"
    assert torch.equal(ours, reference)
    log = comfy.log_text()
    assert log.count("the depth-pruned student removed those blocks") == before + 1
    assert "12 patch(es) on teacher block(s) [1, 4] are not applied" in log


def test_static_schedule_numbers_the_students_blocks(comfy, depth_files, assets_dir):
    """Block ranges name the student's 4 blocks: skipping student block 3 (teacher block 5) at every step equals the
    training-side student with that block masked; a block past the student's last is refused, naming the count."""
    from training.model import WanTransformer
    from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler

    def schedule(text):
        return lambda g, model: g.add("PAREStaticSchedule", model=[model, 0], schedule=text)

    g, save = sample_graph(pare_loader(STUDENT), steps=3, cfg=4.0, seed=5, shift=3.0, patch_model=schedule("3-3@0-1"))
    ours = run_latent(comfy, g, save)
    model = WanTransformer.from_checkpoint(depth_files / STUDENT)
    pos = load_file(str(assets_dir / tiny_assets.POSITIVE))["context"][None]
    neg = load_file(str(assets_dir / tiny_assets.NEGATIVE))["context"][None]

    def velocity(x, t, c, f=None):
        with torch.no_grad():
            return model(x, t, c, block_mask=torch.tensor([[True, True, True, False]] * x.shape[0]))

    ref = ksampler_euler(velocity, initial_noise(ours.shape, 5), flow_sigmas(3, 3.0), Conditioning(pos),
                         Conditioning(neg), cfg=4.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    g, _ = sample_graph(pare_loader(STUDENT), steps=1, patch_model=schedule("2-4@0-1"))
    with pytest.raises(PromptError, match=r"block 4 does not exist \(the model has blocks 0-3\)"):
        comfy.run(g.to_json())
