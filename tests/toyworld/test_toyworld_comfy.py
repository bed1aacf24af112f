"""The shipped toy files in the real ComfyUI: the stock VAELoader + VAEDecode decode the toy VAE exactly as the
training side does, and the toy teacher sampled through PARE Load Pruned Wan + PARE Toy Text Encode + KSampler
gives the training-side reference sampler's latent; the PARE student behind its router at the default knobs keeps
issue 9's criteria against the teacher (compute, latent PSNR, trajectory error)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, read_latent
from graphs import Graph, out
from PIL import Image

from comfyui_pare.safetensors_io import load_tensors, save_atomic
from comfyui_pare.toy_text import ToyTextEncoder
from scripts.toy_assets import (
    FOLDERS,
    TEACHER,
    TEXT,
    VAE,
    WEIGHTS,
    block_compute_ratio,
    node_defaults,
    routing_summary,
    toy_graph,
)
from scripts.workflow_api import ui_to_api
from training.model import WanTransformer
from training.toyworld import evaluate, videos
from training.toyworld.comfy_vae import load_vae
from training.toyworld.evaluate import CFG
from training.toyworld.latent_space import target_latents
from training.toyworld.teacher import SHIFT

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def toy_comfy(comfy):
    for name, folder in FOLDERS.items():
        if not (WEIGHTS / name).exists():
            continue  # student and router: installed where the routed tests need them
        dest = comfy.base / "models" / folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(WEIGHTS / name, dest)
    return comfy


def _frames(paths: list[Path]) -> torch.Tensor:
    arrs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in sorted(paths)]
    return torch.from_numpy(np.stack(arrs)).permute(3, 0, 1, 2)  # [3, F, H, W]


def test_stock_vae_loader_and_decode_match_the_training_side(toy_comfy):
    clip = videos.clip_at(5, "heldout")
    latent = target_latents(videos.render(clip)[None])
    save_atomic(toy_comfy.base / "input" / "toy_clip.latent",
                {"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])}, {})
    g = Graph()
    lat = g.add("LoadLatent", latent="toy_clip.latent")
    vae = g.add("VAELoader", vae_name=VAE)
    dec = g.add("VAEDecode", samples=out(lat), vae=out(vae))
    save = g.add("SaveImage", images=out(dec), filename_prefix="toy_vae")
    entry = toy_comfy.run(g.to_json())
    got = _frames(toy_comfy.output_files(entry, save, "images"))
    want = evaluate.decode(load_vae(load_tensors(WEIGHTS / VAE)[0]), latent)[0]
    assert got.shape == want.shape == (3, 17, videos.SIZE, videos.SIZE)
    assert (got - want).abs().max() <= 1.0 / 255 + 1e-4  # PNG's 8-bit rounding
    assert evaluate.judge(got, clip.objects[0]).direction_right  # the decoded clip shows its motion


def test_toy_teacher_in_comfyui_matches_the_reference_sampler(toy_comfy):
    prompt = "a yellow square moving up and a red circle moving left"
    entry = toy_comfy.run(toy_graph(prompt, 11, routed=False, prefix="toy_ref", decode=False))
    latent = read_latent(toy_comfy.output_files(entry, "7", "latents")[0])
    teacher = WanTransformer.from_checkpoint(WEIGHTS / TEACHER)
    text = ToyTextEncoder.load(WEIGHTS / TEXT)
    want = evaluate.sample(teacher, text, [prompt], [11], SHIFT)
    torch.testing.assert_close(latent, want, rtol=1e-4, atol=1e-4)


def student_vs_teacher(comfy, clips: list, seed: int, shift: float = SHIFT, cfg: float = CFG) -> dict:
    """The PARE student behind PARE Apply Router as added (default knobs) and the teacher, the same prompts, seeds
    (``seed`` + i) and sampler: per-prompt compute ratios (student / teacher per-step block compute), latent PSNRs
    vs the teacher and mean trajectory errors (decoded frames vs the generator's ground truth)."""
    knobs = node_defaults(comfy.object_info(), "PAREApplyRouter")
    vae = load_vae(load_tensors(WEIGHTS / VAE)[0])
    ratios, psnrs, errs, moves = [], [], {"teacher": [], "student": []}, {"teacher": [], "student": []}
    for i, clip in enumerate(clips):
        lat = {}
        for name, routed in (("teacher", False), ("student", True)):
            entry = comfy.run(toy_graph(clip.prompt, seed + i, routed, f"st_{name}_{seed}_{shift}_{cfg}_{i}",
                                        decode=False, router_knobs=knobs, shift=shift, cfg=cfg))
            lat[name] = read_latent(comfy.output_files(entry, "7", "latents")[0])
            if routed:
                ratios.append(block_compute_ratio(routing_summary(entry), comfy.base / "models" / "diffusion_models"))
        psnrs.append(evaluate.latent_psnr(lat["student"], lat["teacher"]))
        frames = evaluate.decode(vae, torch.cat([lat["teacher"], lat["student"]]))
        for name, f in zip(("teacher", "student"), frames):
            verdict = evaluate.judge(f, clip.objects[0])
            errs[name].append(verdict.trajectory_error_px)
            moves[name].append(verdict.direction_right)
    run = {"compute": ratios, "psnr": psnrs, "trajectory": {k: sum(v) / len(v) for k, v in errs.items()},
           "direction_rate": {k: sum(v) / len(v) for k, v in moves.items()}}
    logging.getLogger(__name__).info("toy PARE student vs teacher in ComfyUI (shift %s, CFG %s): %s", shift, cfg, run)
    return run


@pytest.fixture(scope="module")
def default_knobs_run(toy_comfy) -> dict:
    """Issue 9's student run: the 4 held-out directions of a held-out pair and 4 seen prompts, the toy sampler."""
    return student_vs_teacher(toy_comfy, videos.single_clips("heldout")[4:8] + videos.single_clips("seen")[::9], 200)


def test_pare_student_at_the_default_knobs_spends_half_and_keeps_the_motion(default_knobs_run):
    """<= 0.5x the teacher's per-step block compute on every prompt, trajectory error within 20% of the
    teacher's."""
    run = default_knobs_run
    assert max(run["compute"]) <= 0.5, run
    assert run["trajectory"]["student"] <= 1.2 * run["trajectory"]["teacher"], run


def test_pare_student_at_the_default_knobs_keeps_25db_latent_psnr(default_knobs_run):
    """Mean latent PSNR vs the teacher >= 25 dB over the 8 prompts."""
    assert sum(default_knobs_run["psnr"]) / len(default_knobs_run["psnr"]) >= 25.0, default_knobs_run


@pytest.mark.parametrize("shift,cfg", [(1.0, 4.0), (8.0, 4.0), (3.0, 7.0)])
def test_pare_student_off_the_training_sampler_settings(toy_comfy, shift, cfg):
    """Other held-out prompts and seeds under a ModelSamplingSD3 shift and a CFG the router was not trained at: still
    <= 0.5x the teacher's block compute, the student moves the object the named way in >= 80% of the prompts (the
    teacher's own criterion), and its trajectory error stays within 20% of the teacher's. (Latent PSNR is not
    asserted here: CFG 7 amplifies every velocity difference; 27.9 dB measured, 23.9 before the hard-gate phase.)"""
    clips = videos.single_clips("heldout")[0:4] + videos.single_clips("heldout")[8:12]
    run = student_vs_teacher(toy_comfy, clips, 500, shift, cfg)
    assert max(run["compute"]) <= 0.5, run
    assert run["direction_rate"]["student"] >= 0.8, run
    assert run["trajectory"]["student"] <= 1.2 * run["trajectory"]["teacher"], run


def test_demo_graph_samples_like_the_shipped_toy_workflow(toy_comfy):
    """`make demo` and these tests build the toy graph in code (scripts/toy_assets.toy_graph); the artist opens
    workflows/pare_toy_t2v.json. Both rows of the workflow (teacher; routed student) must reach KSampler through the
    same nodes with the same settings as toy_graph, so what the demo measures is what the workflow renders."""
    info = toy_comfy.object_info()
    api = ui_to_api(json.loads((REPO / "workflows" / "pare_toy_t2v.json").read_text()), info)
    knobs = node_defaults(info, "PAREApplyRouter")

    def chain(graph: dict, sampler: str) -> dict[str, dict]:
        """class_type -> widget inputs of every node upstream of ``sampler`` (seeds and prompt text dropped)."""
        seen, todo, out = set(), [sampler], {}
        while todo:
            nid = todo.pop()
            if nid in seen:
                continue
            seen.add(nid)
            node = graph[nid]
            widgets = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
            widgets.pop("seed", None)
            if node["class_type"] == "PAREToyTextEncode":
                widgets["text"] = "<prompt>" if widgets["text"] else ""
            out.setdefault(node["class_type"], []).append(widgets)
            todo += [v[0] for v in node["inputs"].values() if isinstance(v, list)]
        return {k: sorted(v, key=json.dumps) for k, v in out.items()}

    samplers = [nid for nid, n in api.items() if n["class_type"] == "KSampler"]
    rows = {}
    for nid in samplers:
        row = chain(api, nid)
        rows["student" if "PAREApplyRouter" in row else "teacher"] = row
    for name, routed in (("teacher", False), ("student", True)):
        graph = toy_graph("a red circle moving left", 1, routed, "x", router_knobs=knobs)
        assert rows[name] == chain(graph, "6"), name
