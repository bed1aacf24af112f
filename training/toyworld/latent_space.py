"""The toy VAE's latent space, fixed by design rather than discovered by the autoencoder.

Training a Wan2.1 VAE from scratch on this CPU takes longer than the session (it still drew a plain grey frame
after 200 steps; shared/TOYWORLD.md), and the teacher cannot start before the latent space is fixed. So the
latent of each 8x8-pixel cell is prescribed, computed from pixels, and the VAE's encoder is trained to produce
it while its decoder is trained to invert it (both in ComfyUI's real Wan2.1 VAE class). The teacher trains on
these latents from the first minute, in parallel with the VAE.

Latent frame k (Wan's causal layout: frame 0, then one latent per 4 frames) describes video frame 4k:
channels 0-11 are the frame's RGB averaged over 4x4 pixels (a 16x16 image, pixel-unshuffled by 2 onto the 8x8
grid) and channels 12-15 the fraction of non-background pixels in each 4x4 cell (same unshuffle), each centred on
the background and scaled to about unit size, then mapped through Wan2.1's published per-channel mean/std (the
constants ComfyUI's Wan21 latent format normalises with), so ComfyUI hands the model exactly these features.
The decoder fills in the 3 frames between two latent frames (the objects move at constant speed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
from . import videos

FEATURE_SCALE = 3.0


def latent_frame_indices(frames: int) -> list[int]:
    """The video frame each latent frame describes: 0, 4, 8, ... (frames = 4k + 1)."""
    if (frames - 1) % 4:
        raise ValueError(f"a Wan video has 4k + 1 frames, got {frames}")
    return list(range(0, frames, 4))


def features(video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 4k+1, H, W] in [0, 1] -> model-space latent features [B, 16, k+1, H/8, W/8]."""
    b, _, f, h, w = video.shape
    frames = video[:, :, latent_frame_indices(f)].transpose(1, 2).reshape(-1, 3, h, w)  # [B*T, 3, H, W]
    bg = torch.tensor(videos.BACKGROUND, dtype=video.dtype, device=video.device).view(1, 3, 1, 1)
    fg = ((frames - bg).abs().amax(dim=1, keepdim=True) > 0.02).to(video.dtype)
    rgb = F.pixel_unshuffle(F.avg_pool2d(frames - bg, 4), 2)
    cover = F.pixel_unshuffle(F.avg_pool2d(fg, 4), 2)
    feat = torch.cat([rgb * FEATURE_SCALE, cover * FEATURE_SCALE], dim=1)  # [B*T, 16, H/8, W/8]
    return feat.view(b, -1, *feat.shape[1:]).transpose(1, 2).contiguous()


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    view = (1, 16, 1, 1, 1)
    return (torch.tensor(WAN21_LATENTS_MEAN, dtype=like.dtype, device=like.device).view(view),
            torch.tensor(WAN21_LATENTS_STD, dtype=like.dtype, device=like.device).view(view))


def target_latents(video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 4k+1, H, W] in [0, 1] -> the VAE-space latent the toy VAE's encoder is trained to output."""
    feat = features(video)
    mean, std = _stats(feat)
    return feat * std + mean
