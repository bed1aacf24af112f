"""Train the toy Wan2.1 VAE (ComfyUI's class, small base dim) to encode to / decode from the designed latent
space (``latent_space``), resumably.

Fully convolutional, so it trains on short aligned crops: 2 latent frames x 4 x 4 cells <-> 5 video frames x
32 x 32 pixels (the first frame plus one chunk of 4: both paths of Wan's causal feature-cache loop), ~14x
cheaper per sample than whole clips. The decoder learns to reconstruct pixels from the target latents (plus a
little noise, so it tolerates a diffusion model's imperfect latents); shape pixels weigh more than the plain
background, which otherwise dominates the loss. The encoder learns to regress the target latents (every other
step: it is the easier and less used half; text-to-video only decodes).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import videos
from .comfy_vae import build_vae
from .latent_space import FEATURE_SCALE, _stats, target_latents
from .state import load_state, save_state

logger = logging.getLogger(__name__)


@dataclass
class VAEConfig:
    dim: int = 8
    steps: int = 1500
    batch: int = 8
    crop_latent_frames: int = 2
    crop_cells: int = 4
    lr: float = 2e-3
    latent_noise: float = 0.1  # in model-space units (features are about unit size)
    object_weight: float = 8.0
    encoder_every: int = 2
    pool: int = 256  # clips rendered once and cropped from
    save_every: int = 50
    seed: int = 0


def render_pool(n: int, split: str = "train", offset: int = 0) -> torch.Tensor:
    """n clips as uint8 [n, 3, F, S, S]."""
    return torch.stack([(videos.render(videos.clip_at(offset + i, split)) * 255).round().to(torch.uint8)
                        for i in range(n)])


def to_signed(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0  # ComfyUI's Wan VAE works on [-1, 1]


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel differs from the background, else 0 ([B, 1, F, H, W]); x in [-1, 1]."""
    bg = torch.tensor(videos.BACKGROUND).view(1, 3, 1, 1, 1).to(x) * 2 - 1
    return ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(peak * peak / max(mse, 1e-12))


def _crops(pool: torch.Tensor, lat: torch.Tensor, cfg: VAEConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, t, h, w = lat.shape
    xs, zs = [], []
    for _ in range(cfg.batch):
        i = int(torch.randint(n, (1,), generator=gen))
        k = int(torch.randint(t - cfg.crop_latent_frames + 1, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(h - cfg.crop_cells + 1, (2,), generator=gen))
        zs.append(lat[i, :, k:k + cfg.crop_latent_frames, r:r + cfg.crop_cells, c:c + cfg.crop_cells])
        f0, f1 = 4 * k, 4 * (k + cfg.crop_latent_frames - 1) + 1
        xs.append(pool[i, :, f0:f1, 8 * r:8 * (r + cfg.crop_cells), 8 * c:8 * (c + cfg.crop_cells)])
    return to_signed(torch.stack(xs)), torch.stack(zs)


def train_vae(cfg: VAEConfig, state_path: Path) -> nn.Module:
    """Train (or resume from ``state_path``); returns the VAE in eval mode."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    vae = build_vae(cfg.dim, seed=cfg.seed)
    enc_params = [p for n, p in vae.named_parameters() if n.startswith(("encoder.", "conv1."))]
    dec_params = [p for n, p in vae.named_parameters() if n.startswith(("decoder.", "conv2."))]
    opt = torch.optim.AdamW([{"params": dec_params}, {"params": enc_params}], lr=cfg.lr, weight_decay=0.0)
    step = 0
    if state_path.exists():
        step, _ = load_state(state_path, {"vae": vae}, opt)
    pool = render_pool(cfg.pool)
    lat = target_latents(pool.float() / 255.0)
    gen = torch.Generator().manual_seed(cfg.seed + step)  # resumed runs draw fresh crops
    vae.train()
    t0, ema_d, ema_e = time.time(), None, None
    while step < cfg.steps:
        lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))) * min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        x, z = _crops(pool, lat, cfg, gen)
        mean, std = _stats(z)
        noisy = z + cfg.latent_noise * std * torch.randn(z.shape, generator=gen)
        y = vae.decode(noisy)
        w = 1.0 + cfg.object_weight * object_mask(x)
        loss_d = (w * ((y - x).abs() + (y - x).pow(2))).mean()
        loss = loss_d
        if step % cfg.encoder_every == 0:
            enc = (vae.encode(x) - mean) / std
            loss_e = F.mse_loss(enc, (z - mean) / std) / FEATURE_SCALE
            loss = loss + loss_e
            ema_e = loss_e.item() if ema_e is None else 0.9 * ema_e + 0.1 * loss_e.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
        torch.nn.utils.clip_grad_norm_(enc_params, 1.0)
        opt.step()
        step += 1
        ema_d = loss_d.item() if ema_d is None else 0.95 * ema_d + 0.05 * loss_d.item()
        if step % 10 == 0:
            logger.info("vae step %d/%d decoder loss %.4f encoder loss %.4f lr %.2e (%.2f s/step)", step, cfg.steps,
                        ema_d, ema_e or 0.0, lr, (time.time() - t0) / 10)
            t0 = time.time()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(state_path, {"vae": vae}, opt, step)
    return vae.eval()
