"""Aware vs magnitude-only pruning on the shipped toy world, at equal compute: a measurement, not a test.

The two shipped stage-1 students (``pare_toy_student_{aware,magnitude}_stage1``) pruned to the same head/FFN
targets with spatial/temporal-aware scores (``prune --protect normalize``) and with magnitude-only scores
(``--protect none``), then distilled the same way, sampled on held-out and seen prompts; prints their trajectory
errors. training/README.md quotes the result (aware is not clearly ahead on this toy; the reasons are there).

    python -m scripts.compare_aware_magnitude
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from comfyui_pare.compute import model_block_macs
from comfyui_pare.safetensors_io import load_tensors
from comfyui_pare.toy_text import ToyTextEncoder
from training.model import WanTransformer
from training.toyworld import evaluate
from training.toyworld.comfy_vae import load_vae
from training.toyworld.teacher import SHIFT

WEIGHTS = Path(__file__).resolve().parents[1] / "training" / "toyworld" / "weights"
TOKENS = evaluate.LATENT_SHAPE[1] * (evaluate.LATENT_SHAPE[2] // 2) * (evaluate.LATENT_SHAPE[3] // 2)
logger = logging.getLogger("compare_aware_magnitude")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    vae = load_vae(load_tensors(WEIGHTS / "pare_toy_vae.safetensors")[0])
    students = {name: WanTransformer.from_checkpoint(WEIGHTS / f"pare_toy_student_{name}_stage1.safetensors",
                                                     dtype=torch.float32) for name in ("aware", "magnitude")}
    for name, model in students.items():
        macs = sum(b.total for b in model_block_macs(model.meta, TOKENS))
        reps = [evaluate.evaluate(model, text, vae, split, SHIFT, every=every)[0]
                for split, every in (("heldout", 1), ("seen", 3))]
        mean = sum(r.trajectory_error_px for r in reps) / 2
        logger.info("%s: block MACs %.3g, trajectory error %.2f px (held-out %s; seen %s)", name, macs, mean, *reps)


if __name__ == "__main__":
    main()
