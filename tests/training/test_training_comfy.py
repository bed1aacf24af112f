"""Training meets the real ComfyUI: samples saved by PARE Save Calibration Sample feed `calibrate`, and a
distilled student loads through PARE Load Pruned Wan and samples like the training-side model."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import read_latent, run_latent
from graphs import Graph, out, pare_loader, sample_graph
from safetensors.torch import load_file
from training_helpers import distill_toml, write_micro_teacher, write_samples

from comfyui_pare.calibration import read_folder
from scripts import tiny_assets
from training.__main__ import main
from training.calibrate import CalibrationStats
from training.config import load_config
from training.distill import DistillConfig, train
from training.model import WanTransformer
from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler

pytestmark = pytest.mark.comfy


def test_saved_calibration_samples_feed_calibrate(comfy, assets_dir, tmp_path):
    g = Graph()
    cond = g.add("PARELoadConditioning", file=tiny_assets.POSITIVE)
    vae = g.add("VAELoader", vae_name=tiny_assets.VAE)
    image = g.add("EmptyImage", width=32, height=32, batch_size=5, color=0x3366CC)
    latent = g.add("RepeatLatentBatch", samples=out(g.add("VAEEncode", pixels=out(image), vae=out(vae))), amount=2)
    saved_latent = g.add("SaveLatent", samples=out(latent), filename_prefix="calib_ref")
    common = dict(conditioning=out(cond), seed=7, subfolder="calib", width=32, height=32, length=5)
    with_latent = g.add("PARESaveCalibrationSample", prompt="a blue square", filename_prefix="clip",
                        latent=out(latent), **common)
    without = g.add("PARESaveCalibrationSample", prompt="a red circle", filename_prefix="text", **common)
    entry = comfy.run(g.to_json())
    files = {node: entry["outputs"][node]["calibration_samples"] for node in (with_latent, without)}
    assert [f["filename"] for f in files[with_latent]] == ["clip_00001_.safetensors", "clip_00002_.safetensors"]
    assert len(files[without]) == 1 and all(f["subfolder"] == "calib" for f in files[without])

    folder = comfy.base / "output" / "calib"
    samples = {s.path.rsplit("/", 1)[-1]: s for s in read_folder(folder)}
    assert sorted(samples) == ["clip_00001_.safetensors", "clip_00002_.safetensors", "text_00001_.safetensors"]
    cond_file = load_file(str(assets_dir / tiny_assets.POSITIVE))
    ref_latent = read_latent(comfy.output_files(entry, saved_latent, "latents")[0])
    for i, name in enumerate(["clip_00001_.safetensors", "clip_00002_.safetensors"]):
        s = samples[name]
        assert torch.equal(s.context, cond_file["context"]) and torch.equal(s.clip_fea, cond_file["clip_fea"])
        assert torch.equal(s.latent, ref_latent[i]) and s.latent.abs().sum() > 0
        assert (s.seed, s.prompt, s.latent_shape) == (7 + i, "a blue square", (16, 2, 4, 4))
    text = samples["text_00001_.safetensors"]
    assert text.latent is None and text.latent_shape == (16, 2, 4, 4) and text.prompt == "a red circle"

    # The training side reads them: calibrate the tiny teacher on the saved prompts (the one without a latent
    # gets one from the teacher itself).
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", "--teacher", str(assets_dir / tiny_assets.TEACHER_T2V), "--samples", str(folder),
                 "--out", str(stats), "--timesteps", "2", "--query-rows", "16", "--generate-steps", "2",
                 "--device", "cpu"]) == 0
    summary = CalibrationStats.load(stats).summary
    assert summary["samples"] == 3 and summary["sample_files"] == sorted(samples)


def test_distilled_student_loads_in_comfyui_and_matches_training_forward(comfy, assets_dir, tmp_path):
    teacher, samples = tmp_path / "teacher.safetensors", write_samples(tmp_path / "samples", 2)
    write_micro_teacher(teacher, seed=4)
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out",
                 str(tmp_path / "stats.safetensors"), "--timesteps", "1", "--query-rows", "8", "--device", "cpu"]) == 0
    init = tmp_path / "init.safetensors"
    assert main(["prune", "--teacher", str(teacher), "--stats", str(tmp_path / "stats.safetensors"), "--heads",
                 "0.75", "--ffn", "0.5", "--ffn-multiple", "16", "--out", str(init)]) == 0
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(distill_toml(teacher, init, samples, tmp_path / "run", steps=3, learning_rate=1e-3))
    train(load_config(DistillConfig, cfg))
    name = "pare_micro_student.safetensors"
    shutil.copyfile(tmp_path / "run" / "student.safetensors", comfy.base / "models" / "diffusion_models" / name)
    trained = WanTransformer.from_checkpoint(tmp_path / "run" / "student.safetensors")
    assert not torch.equal(trained.blocks[0].ffn[0].weight, WanTransformer.from_checkpoint(init).blocks[0].ffn[0].weight)

    steps, shift, cfg_scale, seed = 3, 5.0, 4.0, 3
    g, save = sample_graph(pare_loader(name), steps=steps, shift=shift, cfg=cfg_scale, seed=seed, frames=9, size=32)
    ours = run_latent(comfy, g, save)
    pos = load_file(str(assets_dir / tiny_assets.POSITIVE))["context"][None]
    neg = load_file(str(assets_dir / tiny_assets.NEGATIVE))["context"][None]
    with torch.no_grad():
        ref = ksampler_euler(trained, initial_noise(ours.shape, seed), flow_sigmas(steps, shift), Conditioning(pos),
                             Conditioning(neg), cfg=cfg_scale)
    assert ours.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
