"""Measure what the toy models draw: sample like ComfyUI's KSampler, decode with the toy VAE, then find each named
object's colour in every frame and compare its centroid path with the generator's ground truth.

Judging a single-object video: the colour is *shown* when at least ``MIN_PIXELS`` pixels are closer to the named
colour than to the background and every other palette colour in at least 80% of the frames; the *direction* is
right when the centroid's displacement from the first to the last frame points the named way by at least
``MIN_TRAVEL_PX`` and more than it strays sideways. The trajectory error is the mean distance (pixels) between the
centroid and the ground truth's (the object rendered from its jitter-free start), a frame without the colour counting as half the frame.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from comfyui_pare.model_family import FAMILIES
from comfyui_pare.toy_text import ToyTextEncoder

from ..sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler
from . import videos

STEPS, CFG = 20, 4.0  # the toy world's default sampler settings (Euler, simple scheduler, shift teacher.SHIFT)
LATENT_SHAPE = FAMILIES["wan2.1-t2v"].latent_shape(videos.FRAMES, videos.SIZE, videos.SIZE)  # (16, 5, 8, 8)
MIN_PIXELS = 12
MIN_TRAVEL_PX = 8.0
MISSING_PX = videos.SIZE / 2


@torch.no_grad()
def sample(model: nn.Module, text: ToyTextEncoder, prompts: list[str], seeds: list[int], shift: float,
           steps: int = STEPS, cfg: float = CFG) -> torch.Tensor:
    """VAE-space latents [B, *LATENT_SHAPE]: what separate KSampler runs (Euler, simple, one seed each) return."""
    noise = torch.cat([initial_noise((1, *LATENT_SHAPE), s) for s in seeds])
    cond = Conditioning(text(prompts))
    uncond = Conditioning(text([""] * len(prompts)))
    return ksampler_euler(model, noise, flow_sigmas(steps, shift), cond, uncond, cfg)


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Frames [B, 3, 17, SIZE, SIZE] in [0, 1], as ComfyUI's VAEDecode post-processes a Wan VAE's output."""
    out = [vae.decode(latents[i:i + batch].float()) for i in range(0, len(latents), batch)]
    return ((torch.cat(out) + 1.0) / 2.0).clamp(0.0, 1.0)


def colour_mask(frames: torch.Tensor, colour: str) -> torch.Tensor:
    """[3, F, H, W] -> bool [F, H, W]: pixels nearest to ``colour`` among the palette and the background."""
    names = list(videos.COLOURS)
    palette = torch.tensor([videos.COLOURS[c] for c in names] + [videos.BACKGROUND])  # [K, 3]
    d = (frames.permute(1, 2, 3, 0)[..., None, :] - palette).pow(2).sum(-1)  # [F, H, W, K]
    nearest = d.argmin(-1)
    return (nearest == names.index(colour)) & (d.min(-1).values < 0.15)


def centroids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [F, H, W] -> (x, y) centroid per frame [F, 2] (NaN where fewer than MIN_PIXELS) and pixel counts [F]."""
    f, h, w = mask.shape
    m = mask.float()
    count = m.sum(dim=(1, 2))
    ys, xs = torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5
    cx = (m.sum(1) * xs).sum(1) / count.clamp(min=1)
    cy = (m.sum(2) * ys).sum(1) / count.clamp(min=1)
    c = torch.stack([cx, cy], 1)
    c[count < MIN_PIXELS] = float("nan")
    return c, count


def ground_truth(obj: videos.ObjectSpec) -> torch.Tensor:
    """Centroid path [F, 2] of the object rendered alone from its jitter-free start, measured like the samples."""
    return _ground_truth(obj.colour, obj.shape, obj.direction).clone()


@functools.lru_cache(maxsize=64)
def _ground_truth(colour: str, shape: str, direction: str) -> torch.Tensor:
    ref = videos.ObjectSpec(colour, shape, direction, videos.start_point(direction))
    return centroids(colour_mask(videos.render(videos.Clip((ref,))), colour))[0]


@dataclass
class Verdict:
    colour_shown: bool
    direction_right: bool
    trajectory_error_px: float
    displacement: tuple[float, float]


def judge(frames: torch.Tensor, obj: videos.ObjectSpec) -> Verdict:
    """Judge one decoded single-object video [3, F, H, W] against its object spec."""
    c, count = centroids(colour_mask(frames, obj.colour))
    present = count >= MIN_PIXELS
    shown = bool(present.float().mean() >= 0.8)
    gt = ground_truth(obj)
    err = torch.where(present, (c - gt).norm(dim=1), torch.tensor(MISSING_PX))
    idx = present.nonzero().flatten()
    if len(idx) >= 2:
        disp = c[idx[-1]] - c[idx[0]]
    else:
        disp = torch.zeros(2)
    dx, dy = videos.DIRECTIONS[obj.direction]
    along = float(disp[0] * dx + disp[1] * dy)
    across = float((disp[0] * dy - disp[1] * dx).abs())
    right = shown and along >= MIN_TRAVEL_PX and along > across
    return Verdict(shown, right, float(err.mean()), (float(disp[0]), float(disp[1])))


def judge_clip(frames: torch.Tensor, clip: videos.Clip) -> Verdict:
    """Judge a one- or two-object video [3, F, H, W] against its clip (e.g. ``videos.parse_prompt``'s, jitter-free
    starts in their lanes): each object against its own path rendered alone from its start; trajectory error and
    displacement averaged over the objects, colour and direction right only when right for every object."""
    parts = []
    for obj in clip.objects:
        c, count = centroids(colour_mask(frames, obj.colour))
        present = count >= MIN_PIXELS
        gt = _ground_truth_from(obj.colour, obj.shape, obj.direction, obj.start)
        err = torch.where(present, (c - gt).norm(dim=1), torch.tensor(MISSING_PX))
        v = judge(frames, obj)  # colour and direction as for a single object (they do not use the start)
        parts.append(Verdict(v.colour_shown, v.direction_right, float(err.mean()), v.displacement))
    k = len(parts)
    return Verdict(all(p.colour_shown for p in parts), all(p.direction_right for p in parts),
                   sum(p.trajectory_error_px for p in parts) / k,
                   (sum(p.displacement[0] for p in parts) / k, sum(p.displacement[1] for p in parts) / k))


@functools.lru_cache(maxsize=256)
def _ground_truth_from(colour: str, shape: str, direction: str, start: tuple[float, float]) -> torch.Tensor:
    ref = videos.ObjectSpec(colour, shape, direction, start)
    return centroids(colour_mask(videos.render(videos.Clip((ref,))), colour))[0]


@dataclass
class Report:
    colour_rate: float
    direction_rate: float
    trajectory_error_px: float
    n: int


def evaluate(model: nn.Module, text: ToyTextEncoder, vae: nn.Module, split: str, shift: float,
             seed: int = 0, steps: int = STEPS, cfg: float = CFG, every: int = 1) -> tuple[Report, torch.Tensor, torch.Tensor]:
    """Every combo x direction of a split (single objects; ``every``-th of them), one seed each; returns
    (report, latents, frames)."""
    clips = videos.single_clips(split)[::every]
    latents = sample(model, text, [c.prompt for c in clips], [seed + i for i in range(len(clips))], shift, steps, cfg)
    frames = decode(vae, latents)
    verdicts = [judge(frames[i], c.objects[0]) for i, c in enumerate(clips)]
    n = len(verdicts)
    report = Report(sum(v.colour_shown for v in verdicts) / n, sum(v.direction_right for v in verdicts) / n,
                    sum(v.trajectory_error_px for v in verdicts) / n, n)
    return report, latents, frames


def latent_psnr(latent: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of a latent against a reference latent, the peak being the reference's value range."""
    mse = (latent.float() - reference.float()).pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return 10.0 * math.log10(peak * peak / max(mse, 1e-20))
