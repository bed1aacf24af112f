"""`make demo`'s budget curve: the PARE student behind PARE Apply Router in mode `budget` at a few budgets, through
the running ComfyUI, with the compute each run actually spent (from the routing report) and its latent PSNR
against the teacher's latent for the same prompt and seed; a small PNG beside the videos."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from scripts import toy_assets
from scripts.comfy_harness import ComfyServer
from training.plots import xy_panels_png
from training.toyworld import evaluate

BUDGETS = (0.6, 0.7, 0.8, 0.9, 1.0)


def budget_curve(server: ComfyServer, knobs: dict, prompt: str, seed: int, teacher_latent: Path,
                 diffusion_models: Path, png: Path) -> list[tuple[float, float, float]]:
    """[(budget, block compute / teacher measured, latent PSNR vs teacher dB)], and the plot at ``png``."""
    reference = load_file(str(teacher_latent))["latent_tensor"]
    rows = []
    for b in BUDGETS:
        graph = toy_assets.toy_graph(prompt, seed, True, f"budget_{b:g}", decode=False,
                                     router_knobs={**knobs, "mode": "budget", "budget": b})
        entry = server.run(graph)
        latent = load_file(str(server.output_files(entry, "7")[0]))["latent_tensor"]
        ratio = toy_assets.block_compute_ratio(toy_assets.routing_summary(entry), diffusion_models)
        rows.append((b, ratio, evaluate.latent_psnr(latent, reference)))
    xy_panels_png(png, [(f"router, budget mode {BUDGETS[0]:g}-{BUDGETS[-1]:g}: latent PSNR vs teacher (dB)",
                         {"PARE student + router": ([r[1] for r in rows], [r[2] for r in rows])})], size=(420, 260))
    return rows
