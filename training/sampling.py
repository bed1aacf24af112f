"""ComfyUI-compatible flow-matching sampling for Wan in plain torch, for references computed outside ComfyUI.

Reproduces ComfyUI 0.3.75 exactly where it matters for matching outputs:

* Sigmas: ``ModelSamplingDiscreteFlow`` (1000 timesteps, multiplier 1000) as the ``ModelSamplingSD3`` node sets
  it up (``shift``), read by the "simple" or "normal" scheduler, trailing 0.0 (``flow_sigmas``).
* Model call (``CONST`` + ``BaseModel._apply_model``): input x unscaled, timestep = sigma * 1000, the model
  predicts the velocity v and denoised = x - sigma * v (computed in float32).
* CFG (``samplers.sampling_function``): cond and uncond run as one batch, uncond first; the result is
  uncond + cfg * (cond - uncond) on the denoised. cfg == 1 runs cond only.
* Euler (``k_diffusion.sampling.sample_euler`` without churn): d = (x - denoised) / sigma, x += d * (next - sigma).
* Noise (``comfy.sample.prepare_noise``): one ``torch.randn`` of the full latent shape from a CPU generator
  seeded with ``seed``; the start is sigma0 * noise + (1 - sigma0) * latent, the end is divided by
  (1 - sigma_last), then ``Wan21`` ``process_out`` maps the model's latent space back to the VAE's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from comfyui_pare.model_family import FAMILIES, LatentSpace

NUM_TIMESTEPS = 1000
MULTIPLIER = 1000.0
SCHEDULERS = ("simple", "normal")


class VelocityModel(Protocol):
    """A Wan transformer call: (x [B, C_in, F, H, W], timestep [B] = sigma * 1000, context, clip_fea) -> v."""

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 clip_fea: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class Conditioning:
    """One side of CFG. ``concat`` ([B, C, F, H, W], I2V mask + image latent) is appended to x on channels."""

    context: torch.Tensor  # [B, L, text_dim]
    clip_fea: torch.Tensor | None = None  # [B, 257, 1280] (I2V)
    concat: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- schedule


def time_snr_shift(shift: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """shift * t / (1 + (shift - 1) * t): the flow shift (ModelSamplingSD3's ``shift``)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flow_sigma_table(shift: float = 1.0) -> torch.Tensor:
    """ModelSamplingDiscreteFlow.sigmas: the 1000 float32 sigmas, ascending (same float ops, so bit-equal)."""
    ts = (torch.arange(1, NUM_TIMESTEPS + 1, 1) / NUM_TIMESTEPS) * MULTIPLIER
    return time_snr_shift(shift, ts / MULTIPLIER)


def flow_sigmas(steps: int, shift: float = 1.0, scheduler: str = "simple") -> torch.Tensor:
    """The float32 schedule [steps + 1] ComfyUI's KSampler uses for a Wan model patched with ModelSamplingSD3.

    "simple": sigmas[-(1 + int(i * 1000 / steps))] for i < steps, then 0.0. "normal": sigma of ``steps``
    timesteps evenly spaced from sigma_max * 1000 to sigma_min * 1000, then 0.0 (ComfyUI's ``normal_scheduler``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    table = flow_sigma_table(shift)
    if scheduler == "simple":
        ss = len(table) / steps
        return torch.FloatTensor([float(table[-(1 + int(i * ss))]) for i in range(steps)] + [0.0])
    if scheduler != "normal":
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    start, end = table[-1] * MULTIPLIER, table[0] * MULTIPLIER
    tail = [0.0]
    if math.isclose(float(time_snr_shift(shift, end / MULTIPLIER)), 0, abs_tol=1e-5):  # shift ~0: ends at 0 itself
        steps, tail = steps + 1, []
    sigs = [float(time_snr_shift(shift, ts / MULTIPLIER)) for ts in torch.linspace(start, end, steps)]
    return torch.FloatTensor(sigs + tail)


def percent_to_sigma(percent: float, shift: float = 1.0) -> float:
    """ComfyUI's schedule position (0 = start, highest noise; 1 = end) as a sigma, for a flow model."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return float(time_snr_shift(shift, 1.0 - percent))


# ---------------------------------------------------------------------------------------------- latents


def latent_space_of(latent: torch.Tensor) -> LatentSpace:
    """The Wan latent space of a [B, C, F, H, W] latent, told by its channels (16: Wan2.1's VAE, 48: Wan2.2's)."""
    spaces = {f.latent.channels: f.latent for f in FAMILIES.values()}
    if latent.ndim != 5 or latent.shape[1] not in spaces:
        raise ValueError(f"expected a Wan latent [B, C, F, H, W] with C in {sorted(spaces)}, got {list(latent.shape)}")
    return spaces[latent.shape[1]]


def latent_stats(space: LatentSpace, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent space's per-channel mean and std as [1, C, 1, 1, 1] tensors on ``like``'s device and dtype."""
    view = (1, space.channels, 1, 1, 1)
    return (torch.tensor(space.mean).view(view).to(like.device, like.dtype),
            torch.tensor(space.std).view(view).to(like.device, like.dtype))


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return latent_stats(latent_space_of(like), like)


def process_in(latent: torch.Tensor) -> torch.Tensor:
    """VAE latent -> model latent space: (latent - mean) / std per channel (Wan21.process_in, scale 1)."""
    mean, std = _stats(latent)
    return (latent - mean) * 1.0 / std


def process_out(latent: torch.Tensor) -> torch.Tensor:
    """Model latent space -> VAE latent: latent * std + mean (Wan21.process_out)."""
    mean, std = _stats(latent)
    return latent * std / 1.0 + mean


def initial_noise(shape: tuple[int, ...] | torch.Size, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Equal to ``comfy.sample.prepare_noise`` (no noise_inds) for a latent of this shape: one CPU randn.

    A private generator gives the same numbers as ComfyUI's seeded global one, without touching global state.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), dtype=dtype, generator=gen, device="cpu")


# ---------------------------------------------------------------------------------------------- denoising


def _bcast(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


def _velocity(model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, sides: list[Conditioning]) -> torch.Tensor:
    """One batched model call for all ``sides`` (in order), ComfyUI's ``calc_cond_batch``: contexts of unequal
    length are repeated to their lcm (attention over repeated tokens is unchanged), as CONDCrossAttn.concat."""
    n = len(sides)
    xs = torch.cat([x if c.concat is None else torch.cat([x, c.concat.to(x)], dim=1) for c in sides])
    lcm = math.lcm(*(c.context.shape[1] for c in sides))
    context = torch.cat([c.context.repeat(1, lcm // c.context.shape[1], 1) for c in sides])
    clip = [c.clip_fea for c in sides]
    if any(c is None for c in clip) and any(c is not None for c in clip):
        raise ValueError("cond and uncond must both have clip_fea or both lack it")
    return model(xs, (sigma * MULTIPLIER).repeat(n).float(), context, None if clip[0] is None else torch.cat(clip))


def cfg_denoise(model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                uncond: Conditioning | None = None, cfg: float = 1.0) -> torch.Tensor:
    """The CFG-combined denoised prediction (float32) for x [B, ...] at sigma [B], as ComfyUI computes it.

    [uncond, cond] run as one batch (separately where ComfyUI would not batch them: contexts whose lengths need
    more than 4x repetition); denoised = x - sigma * v; result uncond + (cond - uncond) * cfg. cfg close to 1
    (math.isclose) skips uncond: the result is cond * cfg (ComfyUI's zero uncond), i.e. cond at cfg 1.
    """
    if uncond is None and not math.isclose(cfg, 1.0):
        raise ValueError(f"cfg {cfg} needs an uncond conditioning (pass cfg=1.0 to run cond only)")
    if math.isclose(cfg, 1.0):
        return (x - _velocity(model, x, sigma, [cond]).float() * _bcast(sigma, x.ndim)) * cfg
    lens = (uncond.context.shape[1], cond.context.shape[1])
    if math.lcm(*lens) // min(lens) > 4:
        v = torch.cat([_velocity(model, x, sigma, [uncond]), _velocity(model, x, sigma, [cond])])
    else:
        v = _velocity(model, x, sigma, [uncond, cond])
    x2, s2 = torch.cat([x, x]), torch.cat([sigma, sigma])
    d_uncond, d_cond = (x2 - v.float() * _bcast(s2, x.ndim)).chunk(2)
    return d_uncond + (d_cond - d_uncond) * cfg


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], sigma [B]) -> denoised
Callback = Callable[[dict], None]


def sample_euler(model_fn: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: Callback | None = None) -> torch.Tensor:
    """k-diffusion Euler (no churn). ``model_fn(x, sigma [B]) -> denoised``; ``x`` starts already noised.

    ``callback`` gets {"x", "i", "sigma", "sigma_hat", "denoised"} each step, before the update (as ComfyUI).
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model_fn(x, sigma * s_in)
        d = (x - denoised) / sigma.reshape((1,) * x.ndim)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma)
    return x


def noise_scaling(sigma: torch.Tensor | float, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """CONST.noise_scaling: the sampler's start, sigma * noise + (1 - sigma) * latent (model space)."""
    return sigma * noise + (1.0 - sigma) * latent


def ksampler_euler(model: VelocityModel, noise: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                   uncond: Conditioning | None = None, cfg: float = 1.0, latent: torch.Tensor | None = None,
                   callback: Callback | None = None) -> torch.Tensor:
    """What ComfyUI's KSampler ("euler", given ``sigmas``) returns for a Wan model: a VAE-space latent.

    ``latent`` is the input LATENT (VAE space); an all-zero or missing one is not shifted by ``process_in``,
    as in ComfyUI. ``noise`` is e.g. ``initial_noise(shape, seed)``.
    """
    sigmas = sigmas.to(noise.device)
    if latent is None:
        latent = torch.zeros_like(noise)
    elif torch.count_nonzero(latent) > 0:
        latent = process_in(latent)
    x = noise_scaling(sigmas[0], noise, latent)
    x = sample_euler(lambda x_, s: cfg_denoise(model, x_, s, cond, uncond, cfg), x, sigmas, callback)
    x = x / (1.0 - sigmas[-1])  # CONST.inverse_noise_scaling
    return process_out(x.to(torch.float32))
