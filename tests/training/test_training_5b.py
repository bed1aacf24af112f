"""The training toolkit on a tiny Wan2.2 TI2V-5B-shaped teacher (48-channel latents of the 16x Wan2.2 VAE):
calibrate -> prune -> distill -> route -> export, and the exported pair loads and samples in ComfyUI like the
training-side model (text-to-video: ComfyUI's Wan22ImageToVideoLatent without a start image)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_latent
from graphs import Graph, out
from route_pipeline import write_config
from safetensors.torch import load_file
from training_helpers import distill_toml, write_micro_teacher, write_samples

from comfyui_pare.router import RoutingPolicy, load_router
from comfyui_pare.wan import WanDims
from scripts import tiny_assets
from training.__main__ import main as training_main
from training.config import load_config
from training.distill import DistillConfig, train
from training.model import WanTransformer
from training.routed import RoutedVelocity
from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler

pytestmark = pytest.mark.comfy
MICRO_5B = WanDims(dim=64, num_heads=4, ffn_dim=128, num_layers=4, text_dim=64, in_dim=48, out_dim=48)
LATENT = [48, 3, 4, 4]  # 9 frames of 64 x 64 through the 16x VAE


@pytest.fixture(scope="module")
def exported(comfy, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("five-b")
    teacher, samples, stats = root / "teacher.safetensors", root / "samples", root / "stats.safetensors"
    write_micro_teacher(teacher, MICRO_5B, seed=2)
    write_samples(samples, 4, latent_shape=LATENT)
    assert training_main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out", str(stats),
                          "--timesteps", "2", "--query-rows", "8", "--device", "cpu"]) == 0
    init = root / "init.safetensors"
    assert training_main(["prune", "--teacher", str(teacher), "--stats", str(stats), "--heads", "0.75", "--ffn",
                          "0.5", "--ffn-multiple", "16", "--out", str(init)]) == 0
    cfg = root / "distill.toml"
    cfg.write_text(distill_toml(teacher, init, samples, root / "distill", steps=2))
    train(load_config(DistillConfig, cfg))
    inputs = {"teacher": teacher, "student": root / "distill" / "student.safetensors", "samples": samples,
              "stats": stats}
    route_cfg = write_config(root / "route.toml", inputs, root / "route", steps=4, batch_size=2,
                             checkpointing_steps=4, extra="")
    assert training_main(["route", "--config", str(route_cfg)]) == 0
    student = comfy.base / "models" / "diffusion_models" / "pare_5b_student.safetensors"
    router = comfy.base / "models" / "pare_routers" / "pare_5b_router.safetensors"
    router.parent.mkdir(parents=True, exist_ok=True)
    assert training_main(["export", "--run", str(root / "route"), "--student-out", str(student),
                          "--router-out", str(router)]) == 0
    return student, router


def test_exported_5b_pair_samples_in_comfyui_like_the_training_side(comfy, exported, assets_dir):
    student_file, router_file = exported
    steps, shift, cfg, seed = 4, 5.0, 3.0, 5
    g = Graph()
    model = g.add("PARELoadPrunedWan", unet_name=student_file.name, weight_dtype="default")
    r = g.add("PARELoadRouter", router_name=router_file.name)
    model = g.add("PAREApplyRouter", model=out(model), router=out(r), mode="threshold", budget=1.0, threshold=0.5,
                  pin_first=1, pin_last=1)
    model = g.add("ModelSamplingSD3", model=out(model), shift=shift)
    pos = g.add("PARELoadConditioning", file=tiny_assets.POSITIVE)
    neg = g.add("PARELoadConditioning", file=tiny_assets.NEGATIVE)
    latent = g.add("PARETestTI2VLatent", width=64, height=64, length=9)
    sampled = g.add("KSampler", model=out(model), seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                    scheduler="simple", positive=out(pos), negative=out(neg), latent_image=out(latent), denoise=1.0)
    save = g.add("SaveLatent", samples=out(sampled), filename_prefix="pare_5b")
    entry = comfy.run(g.to_json())
    ours = read_latent(comfy.output_files(entry, save, "latents")[0])
    assert ours.shape == (1, *LATENT)

    student = WanTransformer.from_checkpoint(student_file)
    router = load_router(router_file)
    velocity = RoutedVelocity(student, router, RoutingPolicy(threshold=0.5, pin_first=1, pin_last=1))
    ctx = {k: load_file(str(assets_dir / f))["context"][None] for k, f in
           (("pos", tiny_assets.POSITIVE), ("neg", tiny_assets.NEGATIVE))}
    ref = ksampler_euler(velocity, initial_noise(ours.shape, seed), flow_sigmas(steps, shift),
                         Conditioning(ctx["pos"]), Conditioning(ctx["neg"]), cfg=cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
