"""The toy VAE's latent space, fixed by design rather than discovered by the autoencoder.

Training a Wan2.1 VAE from scratch on this CPU takes longer than the session (it still drew a plain grey frame
after 200 steps; training/README.md, the toy world), and the teacher cannot start before the latent space is fixed. So the
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

from comfyui_pare.model_family import WAN21_LATENT

from ..sampling import latent_stats
from . import videos

FEATURE_SCALE = 3.0


def latent_frame_indices(frames: int) -> list[int]:
    """The video frame each latent frame describes: 0, 4, 8, ... (frames = 4k + 1)."""
    if (frames - 1) % 4:
        raise ValueError(f"a Wan video has 4k + 1 frames, got {frames}")
    return list(range(0, frames, 4))


def features(video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 4k+1, H, W] in [0, 1] -> model-space latent features [B, 16, k+1, H/8, W/8]."""
    indices = latent_frame_indices(video.shape[2])
    return frame_features(video[:, :, indices], indices)


def frame_features(latent_frames: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The latent frames alone (video frames ``indices`` = 0, 4, 8, ...: [B, 3, k+1, H, W]) -> features
    [B, 16, k+1, H/8, W/8]. RGB is centred on the scene's mean colour, so the scene's tint (its landmarks and clock)
    stays in the features; coverage is measured against the tinted empty scene, so it marks objects only."""
    b, _, f, h, w = latent_frames.shape
    frames = latent_frames.transpose(1, 2).reshape(-1, 3, h, w)  # [B*T, 3, H, W]
    scene = videos.background(indices, h).to(frames).transpose(0, 1).repeat(b, 1, 1, 1)  # [B*T, 3, H, W]
    fg = ((frames - scene).abs().amax(dim=1, keepdim=True) > 0.02).to(frames.dtype)
    bg = torch.tensor(videos.BACKGROUND, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    rgb = F.pixel_unshuffle(F.avg_pool2d(frames - bg, 4), 2)
    cover = F.pixel_unshuffle(F.avg_pool2d(fg, 4), 2)
    feat = torch.cat([rgb * FEATURE_SCALE, cover * FEATURE_SCALE], dim=1)  # [B*T, 16, H/8, W/8]
    return feat.view(b, -1, *feat.shape[1:]).transpose(1, 2).contiguous()


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return latent_stats(WAN21_LATENT, like)


def target_latents(video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 4k+1, H, W] in [0, 1] -> the VAE-space latent the toy VAE's encoder is trained to output."""
    return to_vae_space(features(video))


def to_vae_space(feat: torch.Tensor) -> torch.Tensor:
    """Model-space features -> VAE-space latents (the inverse of ComfyUI's Wan21 process_in)."""
    mean, std = _stats(feat)
    return feat * std + mean
