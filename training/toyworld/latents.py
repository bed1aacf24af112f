"""The teacher's training set, computed once: the generator's training clips as latents of the designed latent
space (``latent_space``) and their prompts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from comfyui_pare.safetensors_io import load_tensors, save_atomic

from . import videos
from .latent_space import frame_features, latent_frame_indices, to_vae_space

logger = logging.getLogger(__name__)


def cache_latents(n: int, path: Path, batch: int = 32) -> None:
    """VAE-space latents [n, 16, 5, H/8, W/8] of training clips 0..n-1, their prompts in the metadata (only the
    video frames the latents describe are rendered)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    zs = []
    keep = latent_frame_indices(videos.FRAMES)
    for start in tqdm(range(0, n, batch), desc="latents"):
        clips = [videos.render(videos.clip_at(i, "train"), keep) for i in range(start, min(n, start + batch))]
        zs.append(to_vae_space(frame_features(torch.stack(clips), keep)))
    z = torch.cat(zs)
    prompts = [videos.clip_at(i, "train").prompt for i in range(n)]
    save_atomic(path, {"latents": z.contiguous()}, {"prompts": json.dumps(prompts)})
    logger.info("cached %d latents %s in %s", n, list(z.shape[1:]), path)


def read_latents(path: Path) -> tuple[torch.Tensor, list[str]]:
    tensors, meta = load_tensors(path)
    return tensors["latents"], json.loads(meta["prompts"])
