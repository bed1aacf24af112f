"""Token reduction on the toy world: quality against the toy teacher at several reduction levels.

Usage: ``python -m scripts.toy_token_reduction [--split seen] [--every 2] [--out result.json]``

For each level, every single-object prompt of the split is sampled as the toy world samples (Euler, 20 steps, CFG 4,
shift 3; one seed per prompt) by the toy teacher with ``training.token_reduction`` on every block (the node's math),
and compared with the unreduced teacher from the same noise:

* latent PSNR (dB) of the final latent against the teacher's (``toyworld.evaluate.latent_psnr``);
* trajectory error: the mean over steps of ||x_t - x_t(teacher)|| / ||x_t(teacher)|| along the sampling path;
* the toy world's own judgement of the decoded video: colour shown, direction right, and the object's path error in
  pixels against the generator's ground truth (``toyworld.evaluate.judge``).

The toy grid is small (5 x 4 x 4 = 80 tokens), so this measures quality, not speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from comfyui_pare.safetensors_io import load_tensors
from comfyui_pare.token_schedule import ReductionRule, TokenSchedule
from comfyui_pare.toy_text import ToyTextEncoder
from training.model import WanTransformer
from training.sampling import percent_to_sigma
from training.token_reduction import TokenReduction
from training.toyworld import evaluate, videos
from training.toyworld.comfy_vae import load_vae
from training.toyworld.teacher import SHIFT

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("toy_token_reduction")
WEIGHTS = REPO / "training" / "toyworld" / "weights"
LEVELS = [(0.25, 0.25), (0.5, 0.0), (0.5, 0.25), (0.5, 0.5), (0.7, 0.7)]  # (q, kv) on every block, every step
GRID = (evaluate.LATENT_SHAPE[1], evaluate.LATENT_SHAPE[2] // 2, evaluate.LATENT_SHAPE[3] // 2)


def run_level(model: WanTransformer, text: ToyTextEncoder, vae, clips, q: float, kv: float, cache_steps: int,
              seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """Final latents, the x_t path (one tensor per step) and the verdicts, with reduction at (q, kv) (None: off)."""
    reduction = None
    if q or kv:
        rules = tuple(ReductionRule(f, tuple(range(model.num_blocks)), r) for f, r in (("q", q), ("kv", kv)) if r)
        reduction = TokenReduction(model, TokenSchedule(rules, num_blocks=model.num_blocks),
                                   lambda p: percent_to_sigma(p, SHIFT), cache_steps)
    path: list[torch.Tensor] = []

    def velocity(x, timestep, context, clip_fea=None):
        sigma = float(timestep[0]) / 1000.0
        if reduction is not None:
            reduction.begin_call(sigma, GRID)
        if not path or sigma != path[-1][0]:
            path.append((sigma, x[: x.shape[0] // 2].clone() if x.shape[0] > len(clips) else x.clone()))
        return model(x, timestep, context, clip_fea)

    try:
        latents = evaluate.sample(velocity, text, [c.prompt for c in clips], [seed + i for i in range(len(clips))],
                                  SHIFT)
    finally:
        if reduction is not None:
            reduction.remove()
    frames = evaluate.decode(vae, latents)
    verdicts = [evaluate.judge(frames[i], c.objects[0]) for i, c in enumerate(clips)]
    return latents, [x for _, x in path], verdicts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="seen", help="toy-world split of prompts (default seen)")
    p.add_argument("--every", type=int, default=1, help="use every n-th prompt of the split")
    p.add_argument("--cache-steps", type=int, default=3, help="matching cache steps (the node's default, 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_teacher.safetensors")
    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    vae = load_vae(load_tensors(WEIGHTS / "pare_toy_vae.safetensors")[0])
    clips = videos.single_clips(args.split)[::args.every]
    rows = []
    with torch.no_grad():
        ref, ref_path, ref_verdicts = run_level(model, text, vae, clips, 0.0, 0.0, args.cache_steps, args.seed)
        for q, kv in [(0.0, 0.0), *LEVELS]:
            lat, path, verdicts = ((ref, ref_path, ref_verdicts) if (q, kv) == (0.0, 0.0) else
                                   run_level(model, text, vae, clips, q, kv, args.cache_steps, args.seed))
            traj = sum(float((a - b).norm() / b.norm()) for a, b in zip(path, ref_path)) / len(ref_path)
            n = len(verdicts)
            rows.append({"q_ratio": q, "kv_ratio": kv,
                         "latent_psnr_db": float("inf") if (q, kv) == (0.0, 0.0) else evaluate.latent_psnr(lat, ref),
                         "trajectory_error": traj,
                         "colour_rate": sum(v.colour_shown for v in verdicts) / n,
                         "direction_rate": sum(v.direction_right for v in verdicts) / n,
                         "path_error_px": sum(v.trajectory_error_px for v in verdicts) / n, "prompts": n})
            logger.info("q %.2f kv %.2f: %s", q, kv, rows[-1])
    print("| q | kv | latent PSNR vs teacher (dB) | trajectory error | colour shown | direction right | path error (px) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['q_ratio']:g} | {r['kv_ratio']:g} | {r['latent_psnr_db']:.1f} | {r['trajectory_error']:.4f} | "
              f"{r['colour_rate']:.0%} | {r['direction_rate']:.0%} | {r['path_error_px']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"split": args.split, "prompts": len(clips), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
