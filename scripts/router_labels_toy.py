"""Oracle labels for the toy router: ``training.router_oracle.mask_tables`` on noised toy clips at every step of the
toy sampler's schedule (20 Euler steps, shift 3, CFG 4), one file per clip (resumable).

    python -m scripts.router_labels_toy --work /tmp/router_labels [--train 48] [--val 12]

Clips: training-split clips from index 2000 (beyond the 160 the student trained on and the 48 that calibrate the
budget curve's router), half single-object and half two-object; validation clips from the "seen" split. Held-out
colour/shape pairs (the evaluation's) are never labelled.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from comfyui_pare.safetensors_io import save_atomic

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("router_labels")
WEIGHTS = REPO / "training" / "toyworld" / "weights"
FIRST_TRAIN = 2000
PIN = (1, 1)


def pick(split: str, first: int, n: int) -> list[tuple[int, object]]:
    """``n`` clips of ``split`` from index ``first``: alternately single- and two-object."""
    from training.toyworld import videos

    singles, doubles, i = [], [], first
    while len(singles) < (n + 1) // 2 or len(doubles) < n // 2:
        clip = videos.clip_at(i, split)
        (doubles if len(clip.objects) == 2 else singles).append((i, clip))
        i += 1
    out = []
    for k in range(n):
        out.append((singles if k % 2 == 0 else doubles)[k // 2])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--val", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from comfyui_pare.toy_text import ToyTextEncoder
    from training.model import WanTransformer
    from training.router_oracle import mask_tables
    from training.sampling import flow_sigmas, process_in
    from training.toyworld import evaluate, videos
    from training.toyworld.latent_space import frame_features, latent_frame_indices, to_vae_space
    from training.toyworld.teacher import SHIFT

    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    teacher = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_teacher.safetensors").eval()
    student = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student.safetensors").eval()
    n = student.num_blocks
    unpinned = list(range(PIN[0], n - PIN[1]))
    sigmas = flow_sigmas(evaluate.STEPS, SHIFT)[:-1].float()
    keep = latent_frame_indices(videos.FRAMES)
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [("train", i, c) for i, c in pick("train", FIRST_TRAIN, args.train)] + \
           [("val", i, c) for i, c in pick("seen", 0, args.val)]
    t0 = time.process_time()
    with torch.no_grad():
        empty = text([""])
        for part, i, clip in jobs:
            out = args.work / f"{part}_{i:05d}.safetensors"
            if out.exists():
                continue
            x0 = process_in(to_vae_space(frame_features(videos.render(clip, keep)[None], keep)))
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(90_000 + i))
            s = sigmas[:, None, None, None, None]
            x = (1 - s) * x0 + s * noise
            ctx = text([clip.prompt])
            steps = len(sigmas)
            tables = mask_tables(student, teacher, x, sigmas * 1000, ctx.expand(steps, -1, -1),
                                 empty.expand(steps, -1, -1), unpinned, evaluate.CFG)
            pooled = student.patch_embed(x)
            save_atomic(out, {"tables": tables.contiguous(), "sigmas": sigmas.clone(), "context": ctx[0].contiguous(),
                              "token_mean": pooled.mean(1).contiguous(), "token_std": pooled.std(1).contiguous()},
                        {"prompt": clip.prompt, "objects": str(len(clip.objects)), "index": str(i), "split": part})
            log.info("%s %d (%d objects): done, cpu %.0f s", part, i, len(clip.objects), time.process_time() - t0)
    log.info("labels: %d clips, cpu %.0f s", len(jobs), time.process_time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
