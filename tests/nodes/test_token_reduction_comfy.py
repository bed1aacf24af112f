"""PARE Token Reduction through a real ComfyUI server: identity at ratio 0, equality with an outside reference
(training's WanTransformer + reference sampler applying the same merges) when stacked with a pruned student, PARE
routing, a LoRA and CFG, and clear errors for bad schedules while the server keeps serving."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_latent
from graphs import chain, out, pare_loader, sample_graph
from safetensors.torch import load_file

from comfyui_pare.pruned import save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.token_schedule import parse_schedule_text
from comfyui_pare.wan_reader import load_checkpoint
from scripts import tiny_assets
from scripts.comfy_harness import PromptError

# Tests marked every_comfyui also run on ComfyUI 0.8.0 (the rest on the pinned 0.3.75 only, for CI time).
pytestmark = pytest.mark.comfy
N = tiny_assets.TINY_T2V.num_layers
STUDENT = "tr_tiny_student.safetensors"
LORA = "tr_tiny_student_lora.safetensors"
# Keys/values from 30% of the schedule: with shift 5 that covers more steps than the default shift would.
SCHEDULE = {"num_blocks": N, "stride": [1, 2, 2], "metric": "cosine", "mode": "mean", "seed": 5, "rules": [
    {"feature": "q", "blocks": "0-5", "ratio": 0.5},
    {"feature": "q", "blocks": "3", "start_percent": 0.5, "ratio": 0.7},
    {"feature": "kv", "blocks": "1-4", "start_percent": 0.3, "ratio": 0.4}]}
ZERO = {"num_blocks": N, "rules": [{"feature": "q", "blocks": "all", "ratio": 0.0},
                                   {"feature": "kv", "blocks": "all", "ratio": 0.0}]}


def reduce_tokens(doc: dict | None = None, text: str | None = None, **kw):
    """A patch_model hook: PARE Token Reduction with a custom schedule (``doc`` inline, or ``text`` as typed)."""
    def patch(g, model):
        inputs = {"schedule": "custom", "strength": 1.0, "matching_cache_steps": 1, "start_percent": 0.0,
                  "end_percent": 1.0, **kw}
        inputs["schedule_json"] = text if text is not None else json.dumps(doc)
        return g.add("PARETokenReduction", model=out(model), **inputs)
    return patch


@pytest.mark.every_comfyui
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_ratio_zero_is_bit_identical_to_no_node(comfy, variant):
    name = tiny_assets.TEACHER_T2V if variant == "t2v" else tiny_assets.TEACHER_I2V
    kw = dict(cfg=3.0, steps=3, seed=11, sampler="uni_pc", variant=variant)
    plain = run_latent(comfy, *sample_graph(pare_loader(name), **kw))
    zero = run_latent(comfy, *sample_graph(pare_loader(name), patch_model=reduce_tokens(ZERO), **kw))
    assert torch.equal(plain, zero)
    if variant == "i2v":  # the rest is the same code path as T2V (the image only adds channels and CLIP tokens)
        return
    off = run_latent(comfy, *sample_graph(pare_loader(name), patch_model=reduce_tokens(SCHEDULE, strength=0.0), **kw))
    assert torch.equal(plain, off)
    on = run_latent(comfy, *sample_graph(pare_loader(name), patch_model=reduce_tokens(SCHEDULE), **kw))
    assert (on - plain).abs().max() > 1e-3, "a non-zero schedule must change the result"
    # every block's self-attention was reduced at every step (q is reduced everywhere), and only that call
    assert f"reduced {3 * N} of {3 * N} self-attention calls" in comfy.log_text()


# -- stacked with a pruned student, PARE routing, a LoRA and CFG vs an outside reference ---------------------

@pytest.fixture(scope="module")
def stacked_files(comfy, assets_dir):
    """A pruned student (fewer heads in blocks 1 and 3) and a LoRA of the student's shapes. The head counts are even
    (head dim 32: widths on the tensor-core grain, as `prune` makes them), so the loader pads nothing and the stock
    LoRA loader fits the student's weights."""
    sd, meta = load_checkpoint(assets_dir / tiny_assets.TEACHER_T2V)
    plan = PrunePlan([BlockPlan(heads=[0, 2, 5, 7]) if i == 1 else BlockPlan(heads=[1, 3, 4, 6]) if i == 3
                      else BlockPlan() for i in range(N)])
    student, student_meta = prune_state_dict(sd, meta, plan)
    save_checkpoint(comfy.base / "models" / "diffusion_models" / STUDENT, student, student_meta)
    gen = torch.Generator().manual_seed(9)
    lora: dict[str, torch.Tensor] = {}
    for module in ("blocks.1.self_attn.q", "blocks.3.self_attn.v", "blocks.2.cross_attn.o"):
        w = student[f"{module}.weight"]
        lora[f"diffusion_model.{module}.lora_up.weight"] = 0.5 * torch.randn(w.shape[0], 4, generator=gen)
        lora[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        lora[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    save_atomic(comfy.base / "models" / "loras" / LORA, lora, {"format": "pt"})
    return student, student_meta, lora


def reference_latent(student, meta, lora, assets_dir, schedule_doc: dict, *, steps, shift, cfg, seed, cache_steps, skip_block,
                     skip_until, shape):
    """training's WanTransformer + reference sampler, LoRA merged by hand, block skipped by mask, and every
    self-attention replaced by the core's reduced attention at the schedule's ratios."""
    from training.model import WanTransformer
    from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler, percent_to_sigma
    from training.token_reduction import TokenReduction

    sd = dict(student)
    for key in [k for k in lora if k.endswith(".lora_up.weight")]:
        module = key[len("diffusion_model."):-len(".lora_up.weight")]
        up, down = lora[key], lora[key.replace("lora_up", "lora_down")]
        alpha = float(lora[f"diffusion_model.{module}.alpha"])
        sd[f"{module}.weight"] = sd[f"{module}.weight"] + (alpha / down.shape[0]) * (up @ down)
    model = WanTransformer.from_state_dict(sd, meta)
    reduction = TokenReduction(model, parse_schedule_text(json.dumps(schedule_doc)),
                               lambda p: percent_to_sigma(p, shift), cache_steps)
    grid = (shape[2], shape[3] // 2, shape[4] // 2)

    def velocity(x, timestep, context, clip_fea=None):
        sigma = float(timestep[0]) / 1000.0
        reduction.begin_call(sigma, grid)
        mask = torch.ones(x.shape[0], N, dtype=torch.bool)
        if sigma >= percent_to_sigma(skip_until, shift):
            mask[:, skip_block] = False
        with torch.no_grad():
            return model(x, timestep, context, block_mask=mask)

    pos = load_file(str(assets_dir / tiny_assets.POSITIVE))["context"][None]
    neg = load_file(str(assets_dir / tiny_assets.NEGATIVE))["context"][None]
    sigmas = flow_sigmas(steps, shift)
    return ksampler_euler(velocity, initial_noise(shape, seed), sigmas, Conditioning(pos), Conditioning(neg), cfg=cfg)


@pytest.mark.every_comfyui
def test_stacked_with_routing_lora_and_cfg_equals_outside_reference(comfy, stacked_files, assets_dir):
    student, meta, lora = stacked_files
    steps, shift, cfg, seed, cache_steps = 4, 5.0, 4.0, 17, 2

    def lora_hook(g, model):
        return g.add("LoraLoaderModelOnly", model=out(model), lora_name=LORA, strength_model=1.0)

    def routing(g, model):
        return g.add("PAREStaticSchedule", model=out(model), schedule="2@0-0.5")

    reduction = reduce_tokens(SCHEDULE, matching_cache_steps=cache_steps)
    results = []
    for hooks in ((lora_hook, routing, reduction), (reduction, routing, lora_hook)):
        g, save = sample_graph(pare_loader(STUDENT), cfg=cfg, steps=steps, shift=shift, seed=seed,
                               patch_model=chain(*hooks))
        results.append(run_latent(comfy, g, save))
    assert torch.equal(results[0], results[1]), "the order of the patches must not matter"
    kw = dict(steps=steps, shift=shift, cfg=cfg, seed=seed, cache_steps=cache_steps, skip_block=2, skip_until=0.5,
              shape=results[0].shape)
    ref = reference_latent(student, meta, lora, assets_dir, SCHEDULE, **kw)
    torch.testing.assert_close(results[0], ref, rtol=1e-4, atol=1e-4)
    # the comparison means something: without reduction the reference is far from ours
    assert (reference_latent(student, meta, lora, assets_dir, ZERO, **kw) - results[0]).abs().max() > 1e-2


# -- bad schedules ------------------------------------------------------------------------------------------

def test_bad_schedules_fail_clearly_and_server_keeps_serving(comfy):
    folder = comfy.base / "models" / "pare_token_schedules"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tr_bad_block.json").write_text(json.dumps({"rules": [{"feature": "q", "blocks": "2-9", "ratio": 0.5}]}))
    (folder / "tr_not_json.json").write_text("{rules: nope")
    (folder / "tr_binary.json").write_bytes(b"\xff\xfe\x00\x81")
    cases = [
        (reduce_tokens(text="tr_bad_block.json"), ["tr_bad_block.json", "rules[0].blocks names block 6",
                                                   "blocks 0-5"]),
        (reduce_tokens({"rules": [{"feature": "kv", "blocks": "1", "ratio": 1.0}]}),
         ["inline schedule_json", "rules[0].ratio must be in [0, 1), got 1.0"]),
        (reduce_tokens({"rules": [{"feature": "q", "blocks": "1", "ratio": -0.2}]}), ["rules[0].ratio"]),
        (reduce_tokens(text="tr_missing.json"), ["tr_missing.json", "cannot be read"]),
        (reduce_tokens(text="tr_not_json.json"), ["tr_not_json.json", "not valid JSON"]),
        (reduce_tokens(text="tr_binary.json"), ["tr_binary.json", "cannot be read"]),
        (reduce_tokens(text="", schedule="balanced"), ["preset 'balanced'", "this model has 6 blocks"]),
        (reduce_tokens(text=""), ["schedule_json is empty"]),
    ]
    for k, (hook, needles) in enumerate(cases):
        with pytest.raises(PromptError) as err:
            comfy.run(sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1, seed=100 + k,
                                   patch_model=hook)[0].to_json())
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))
        if k in (0, len(cases) - 1):  # the server keeps serving, token reduction included
            good = run_latent(comfy, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1, seed=200 + k,
                                                   patch_model=reduce_tokens(SCHEDULE)))
            assert torch.isfinite(good).all()


def test_node_listed_with_tooltips(comfy):
    info = comfy.object_info()["PARETokenReduction"]
    assert info["description"] and info["display_name"] == "PARE Token Reduction"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"model", "schedule", "strength", "matching_cache_steps", "start_percent", "end_percent",
                           "schedule_json"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), name
    assert inputs["schedule"][0] == ["conservative", "balanced", "fast", "custom"] or \
        inputs["schedule"][1].get("options") == ["conservative", "balanced", "fast", "custom"]
