"""`make demo`: the toy world's Wan2.1 teacher beside its PARE student, both sampled by a real, headless ComfyUI.

1. installs the shipped toy weights (training/toyworld/weights/: teacher, PARE student, router, VAE, text encoder)
   into a ComfyUI base directory under demo-output/;
2. starts ComfyUI 0.3.75 with this pack and runs the same toy graph (PARE Toy Text Encode prompts, KSampler,
   VAEDecode, animated WebP) twice with the same prompt, seed and sampler: once with the teacher, once with the
   PARE student behind PARE Apply Router at the node's default budget;
3. writes demo-output/toy_teacher.webp, toy_student.webp, toy_side_by_side.webp (+ a PNG strip of its frames)
   toy_routing.png (the routing heat map) and toy_budget_curve.png (the router in mode `budget` at 0.6-1.0:
   compute spent and latent PSNR, ``demo_budget.py``), and prints the table: per-step compute ratio, measured sampling-time
   ratio, latent PSNR vs the teacher, trajectory error vs the generator's ground truth.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from scripts import demo_budget, toy_assets
from scripts.comfy_harness import REPO, ComfyServer
from training.toyworld import evaluate, videos

OUT = Path(os.environ.get("PARE_DEMO_OUT", REPO / "demo-output"))
PROMPT = os.environ.get("PARE_DEMO_PROMPT", "a green circle moving right")  # a held-out colour/shape pair
SEED = int(os.environ.get("PARE_DEMO_SEED", "3"))
TIMING_RUNS = 3
log = logging.getLogger("demo")


def read_frames(webp: Path) -> torch.Tensor:
    """Animated WebP -> frames [3, F, H, W] in [0, 1]."""
    with Image.open(webp) as im:
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)


def side_by_side(a: Path, b: Path, webp: Path, png: Path, scale: int = 3) -> None:
    """Two videos next to each other (teacher left, student right), upscaled; and a strip of every 4th frame."""
    fa, fb = read_frames(a), read_frames(b)
    both = torch.cat([fa, torch.ones(3, fa.shape[1], fa.shape[2], 2), fb], dim=3)  # 2-px white divider
    imgs = [Image.fromarray((both[:, k].permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for k in range(both.shape[1])]
    imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in imgs]
    imgs[0].save(webp, save_all=True, append_images=imgs[1:], duration=125, loop=0, lossless=True)
    picks = imgs[::4]
    strip = Image.new("RGB", (picks[0].width, picks[0].height * len(picks)), "white")
    for j, im in enumerate(picks):
        strip.paste(im, (0, j * im.height))
    strip.save(png)


def latent_psnr(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return evaluate.latent_psnr(student, teacher)


def timed(server: ComfyServer, graph: dict) -> float:
    t0 = time.perf_counter()
    server.run(graph)
    return time.perf_counter() - t0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    t_start = time.time()
    OUT.mkdir(exist_ok=True)
    base = OUT / "comfy-base"
    toy_assets.install(base)
    server = ComfyServer(base_dir=base)
    log.info("starting ComfyUI (log: %s)", server.log_path)
    with server:
        knobs = toy_assets.node_defaults(server.object_info(), "PAREApplyRouter")
        runs = {}
        for name, routed in (("teacher", False), ("student", True)):
            entry = server.run(toy_assets.toy_graph(PROMPT, SEED, routed, f"toy_{name}", router_knobs=knobs))
            runs[name] = entry
            shutil.copyfile(server.output_files(entry, "9")[0], OUT / f"toy_{name}.webp")
            shutil.copyfile(server.output_files(entry, "7")[0], OUT / f"toy_{name}_latent.latent")
        shutil.copyfile(server.output_files(runs["student"], "11")[0], OUT / "toy_routing.png")
        summary = toy_assets.routing_summary(runs["student"])
        # Sampling time: models are loaded by now; latent-only graphs with fresh seeds (ComfyUI would reuse a
        # cached result for an unchanged graph), teacher and student alternating, best of TIMING_RUNS each.
        times = {"teacher": [], "student": []}
        for k in range(TIMING_RUNS):
            for name, routed in (("teacher", False), ("student", True)):
                g = toy_assets.toy_graph(PROMPT, SEED + 1000 + k, routed, f"time_{name}", decode=False,
                                         router_knobs=knobs)
                times[name].append(timed(server, g))
        curve = demo_budget.budget_curve(server, knobs, PROMPT, SEED, OUT / "toy_teacher_latent.latent",
                                         base / "models" / "diffusion_models", OUT / "toy_budget_curve.png")
    side_by_side(OUT / "toy_teacher.webp", OUT / "toy_student.webp", OUT / "toy_side_by_side.webp",
                 OUT / "toy_side_by_side_frames.png")
    lat = {n: load_file(str(OUT / f"toy_{n}_latent.latent"))["latent_tensor"] for n in runs}
    clip = videos.parse_prompt(PROMPT)
    verdicts = {n: evaluate.judge(read_frames(OUT / f"toy_{n}.webp"), clip.objects[0]) for n in runs}
    ratio = toy_assets.block_compute_ratio(summary, base / "models" / "diffusion_models")
    t_ratio = min(times["student"]) / min(times["teacher"])
    rows = [
        ("per-step block compute (student / teacher)", f"{ratio:.3f}"),
        ("sampling time (student / teacher, best of 3)", f"{t_ratio:.3f}  ({min(times['student']):.2f} s / "
                                                          f"{min(times['teacher']):.2f} s)"),
        ("latent PSNR, student vs teacher", f"{latent_psnr(lat['student'], lat['teacher']):.1f} dB"),
        ("trajectory error vs ground truth, teacher", f"{verdicts['teacher'].trajectory_error_px:.2f} px"),
        ("trajectory error vs ground truth, student", f"{verdicts['student'].trajectory_error_px:.2f} px"),
        ("direction right (teacher / student)", f"{verdicts['teacher'].direction_right} / "
                                                f"{verdicts['student'].direction_right}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nPARE toy demo: '{PROMPT}', seed {SEED}, {toy_assets.STEPS} {toy_assets.SAMPLER} steps, CFG "
          f"{toy_assets.CFG}, shift {toy_assets.SHIFT}; PARE Apply Router at its defaults {knobs}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("  router budget curve (mode 'budget'; compute / teacher measured, latent PSNR): " +
          ", ".join(f"{b:g}: {c:.3f} {p:.1f} dB" for b, c, p in curve))
    for line in summary.splitlines():
        log.info("%s", line)
    log.info("wrote %s (teacher left, student right), %s, %s, %s in %.0f s", OUT / "toy_side_by_side.webp",
             OUT / "toy_side_by_side_frames.png", OUT / "toy_routing.png", OUT / "toy_budget_curve.png",
             time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
