"""The PARE router: which transformer blocks run at this step, for this sample.

Three parts (docs/method.md, "Depth: the router"):

* ``BlockRouter``: a small MLP from (a timestep embedding, mean and std over tokens of the patch-embedded latent,
  optionally the mean text context) to one logit per block. Its cost is a pooling pass plus two tiny matmuls, far
  below 0.1% of one block. Format 2 adds what makes a router adapt (issue 28): a per-block *prior* interpolated
  over the timestep (a searched static schedule's order, so the learned part only has to correct it per input),
  LayerNorm on the pooled content features (the raw pooled latent mostly re-encodes the noise level and, being
  unnormalised, killed every hidden unit of the first toy router), a smooth Fourier timestep code, and an option to
  leave the pooled latent out.
* ``RoutingPolicy`` + ``decide``: turn logits into a boolean run-mask per sample, by threshold or by a
  compute budget, with pinned blocks always on.
* The file format: safetensors with the spec as JSON under the header key ``pare_router``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import PareFormatError, shape_error
from .safetensors_io import load_tensors, read_header, save_atomic
from .untrusted import quote, strict_int

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: the MLP alone; 2: + timestep prior, LayerNorm, Fourier timestep code, optional tokens
METADATA_KEY = "pare_router"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_POOL_CHUNK_ELEMENTS = 1 << 24  # float32 elements per pooling chunk: bounds the upcast copy to 64 MiB
# On a GPU each chunk costs ~8 kernel launches that the routed step waits for (the decision is read back before
# block 1 runs): 1 << 24 makes 20 chunks at 14B width and 32,760 tokens, so launch latency, not the pooling's
# memory traffic, sets the router's time there. Larger chunks there (a 256 MiB upcast copy) launch ~4x fewer.
_POOL_CHUNK_ELEMENTS_GPU = 1 << 26


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to rebuild a router and to check it fits a model."""

    num_blocks: int
    dim: int  # width of the patch-embedded tokens (the model's dim)
    freq_dim: int = 256
    text_dim: int = 0  # 0: no text input
    hidden: int = 128
    model_fingerprint: str = ""  # PrunedWanMeta.fingerprint() of the model it was trained for
    default_threshold: float = 0.5
    train_budget: float | None = None
    # Format 2 (all off: a format-1 router, written as format 1 so older packs read it):
    prior_knots: int = 0  # timesteps of the per-block prior (0: no prior)
    layer_norm: bool = False  # LayerNorm on the pooled tokens and on the pooled text
    token_input: bool = True  # read the pooled patch-embedded latent (False: timestep and text only)
    time_code: str = "sinusoidal"  # "sinusoidal": Wan's embedding; "fourier": cos/sin(k pi t / 1000), k = 1..freq_dim/2

    def __post_init__(self) -> None:
        for name, low in (("num_blocks", 1), ("dim", 1), ("freq_dim", 2), ("text_dim", 0), ("hidden", 1),
                          ("prior_knots", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"RouterSpec.{name} must be an integer >= {low}, got {v!r}")
        if self.freq_dim % 2:
            raise ValueError(f"RouterSpec.freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if not isinstance(self.model_fingerprint, str):
            raise ValueError(f"RouterSpec.model_fingerprint must be a string, got {self.model_fingerprint!r}")
        _check_fraction("RouterSpec.default_threshold", self.default_threshold)
        if self.train_budget is not None:
            _check_fraction("RouterSpec.train_budget", self.train_budget)
        for name in ("layer_norm", "token_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RouterSpec.{name} must be true or false, got {getattr(self, name)!r}")
        if self.time_code not in TIME_CODES:
            raise ValueError(f"RouterSpec.time_code must be one of {TIME_CODES}, got {self.time_code!r}")

    @property
    def version(self) -> int:
        """The file format this spec needs: 1 unless a format-2 feature is on."""
        v1 = (self.prior_knots == 0 and not self.layer_norm and self.token_input and self.time_code == "sinusoidal")
        return 1 if v1 else 2

    @property
    def features(self) -> int:
        """Input width of the MLP: timestep code, pooled mean and std (if read), pooled text."""
        return self.freq_dim + (2 * self.dim if self.token_input else 0) + self.text_dim

    def to_json(self) -> dict:
        d = asdict(self)
        if self.version == 1:  # byte-identical metadata for format-1 routers: older packs read them
            for k in ("prior_knots", "layer_norm", "token_input", "time_code"):
                d.pop(k)
        return {"format_version": self.version, **d}

    @classmethod
    def from_json(cls, obj: Mapping, source: str = "router") -> "RouterSpec":
        if not isinstance(obj, Mapping):
            raise PareFormatError(f"{source}: '{METADATA_KEY}' metadata is not a JSON object")
        try:
            version = int(obj["format_version"])
        except (KeyError, TypeError, ValueError) as e:
            raise PareFormatError(f"{source}: router metadata has no valid 'format_version'") from e
        if version > FORMAT_VERSION or version < 1:
            raise PareFormatError(
                f"{source}: router format version {version} is not supported (this pack reads up to "
                f"{FORMAT_VERSION}); update comfyui-pare"
            )
        required = ("num_blocks", "dim", "freq_dim", "text_dim", "hidden")
        missing = [k for k in required if k not in obj]
        if missing:
            raise PareFormatError(f"{source}: router metadata lacks {missing}")
        budget = obj.get("train_budget")
        _check_spec_numbers(obj, source)
        for name in ("layer_norm", "token_input"):
            if name in obj and not isinstance(obj[name], bool):
                raise PareFormatError(f"{source}: router metadata field '{name}' must be true or false, "
                                      f"got {quote(obj[name])}")
        if obj.get("time_code", "sinusoidal") not in TIME_CODES:
            raise PareFormatError(f"{source}: router metadata field 'time_code' must be one of {TIME_CODES}, got "
                                  f"{quote(obj.get('time_code'))}")
        try:
            return cls(
                num_blocks=obj["num_blocks"],
                dim=obj["dim"],
                freq_dim=obj["freq_dim"],
                text_dim=obj["text_dim"],
                hidden=obj["hidden"],
                model_fingerprint=str(obj.get("model_fingerprint", "")),
                default_threshold=float(obj.get("default_threshold", 0.5)),
                train_budget=None if budget is None else float(budget),
                prior_knots=obj.get("prior_knots", 0),
                layer_norm=obj.get("layer_norm", False),
                token_input=obj.get("token_input", True),
                time_code=obj.get("time_code", "sinusoidal"),
            )
        except (TypeError, ValueError) as e:
            raise PareFormatError(f"{source}: router metadata is malformed ({e})") from e

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The state-dict keys of a ``BlockRouter`` with this spec and their shapes."""
        shapes = {
            "fc1.weight": (self.hidden, self.features),
            "fc1.bias": (self.hidden,),
            "fc2.weight": (self.num_blocks, self.hidden),
            "bias": (self.num_blocks,),
        }
        if self.prior_knots:
            shapes.update({"prior_timesteps": (self.prior_knots,), "prior_logits": (self.prior_knots, self.num_blocks)})
        if self.layer_norm and self.token_input:
            shapes.update({"token_norm.weight": (2 * self.dim,), "token_norm.bias": (2 * self.dim,)})
        if self.layer_norm and self.text_dim:
            shapes.update({"text_norm.weight": (self.text_dim,), "text_norm.bias": (self.text_dim,)})
        return shapes


TIME_CODES = ("sinusoidal", "fourier")
_SPEC_LIMIT = 1 << 20  # no router dimension comes near this (Wan2.1 14B: dim 5120, 40 blocks)


def _check_spec_numbers(obj: Mapping, source: str) -> None:
    """Router metadata numbers: integers (not 3.7 or true, which int() would round) within sane bounds, and finite
    threshold / budget; errors name the file and the field."""
    for name, low in (("num_blocks", 1), ("dim", 1), ("freq_dim", 2), ("text_dim", 0), ("hidden", 1)):
        strict_int(obj[name], f"{source}: router metadata field '{name}'", low, _SPEC_LIMIT, PareFormatError)
    if "prior_knots" in obj:
        strict_int(obj["prior_knots"], f"{source}: router metadata field 'prior_knots'", 0, _SPEC_LIMIT,
                   PareFormatError)
    for name in ("default_threshold", "train_budget"):
        value = obj.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise PareFormatError(f"{source}: router metadata field '{name}' must be a number in [0, 1], "
                                  f"got {quote(value)}")


def _check_finite_weights(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """A NaN or infinite weight makes a block's logit NaN, and a NaN logit silently never runs the block."""
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise PareFormatError(f"{path}: router tensor '{key}' has {bad} NaN or infinite value(s); the file is "
                                  "corrupt or from a diverged training run")


def timestep_embedding(timestep: torch.Tensor, freq_dim: int = 256) -> torch.Tensor:
    """Wan's sinusoidal timestep embedding: [cos | sin] of timestep * 10000^(-i/half), in float32.

    ``timestep`` is the model's timestep in [0, 1000] (ComfyUI passes sigma * 1000), shape [B] or scalar.
    """
    half = freq_dim // 2
    t = timestep.reshape(-1).to(torch.float32)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def fourier_time_code(timestep: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """[cos | sin](k pi t / 1000), k = 1 .. freq_dim / 2, in float32: smooth over [0, 1000], so a router fitted on
    one step count reads sensible values at the timesteps of another (Wan's embedding turns over within one
    timestep unit at its highest frequencies)."""
    half = freq_dim // 2
    t = timestep.reshape(-1).to(torch.float32) / 1000.0
    angles = torch.outer(t, math.pi * torch.arange(1, half + 1, dtype=torch.float32, device=t.device))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def interpolate_prior(timestep: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[B, N]: ``values`` [K, N] at ascending ``knots`` [K], interpolated linearly in the timestep, clamped outside."""
    t = timestep.reshape(-1).to(knots.dtype).clamp(knots[0], knots[-1])
    hi = torch.searchsorted(knots, t, right=False).clamp(1, max(1, knots.numel() - 1))
    if knots.numel() == 1:
        return values[:1].expand(t.shape[0], -1)
    lo = hi - 1
    span = (knots[hi] - knots[lo]).clamp_min(1e-12)
    w = ((t - knots[lo]) / span)[:, None]
    return values[lo] * (1 - w) + values[hi] * w


def sample_timesteps(timestep: torch.Tensor) -> torch.Tensor:
    """One timestep per sample: [B] as it is; a per-frame timestep [B, latent frames] becomes its max over frames.

    The rule for per-frame timesteps (Wan2.2 TI2V-5B with a start image, ``Wan22ImageToVideoLatent``): ComfyUI's
    ``WAN22.process_timestep`` gives each latent frame ``t * mean(noise mask of that frame)``, so the clean start
    frame gets 0 and every noisy frame the sampler's t. The max over frames is that t, the timestep the same call
    would have without a start image, so a router decides for a start-image run exactly as for a text-to-video run
    at the same step. Rows stay independent (cond and uncond rows each keep their own)."""
    t = torch.as_tensor(timestep)
    if t.ndim <= 1:
        return t
    if t.ndim != 2:
        raise ValueError(f"router expects a timestep [batch] or [batch, latent frames], got {list(t.shape)}")
    return t.amax(dim=1)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[B, L, D] -> [B, 2D]: mean and (population) std over tokens, computed in float32.

    Works in chunks of tokens so a bf16 [1, 75600, 5120] latent is never upcast whole.
    """
    if tokens.ndim != 3 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, tokens, dim] with at least one token, got {list(tokens.shape)}")
    b, n, d = tokens.shape
    chunk = _POOL_CHUNK_ELEMENTS if tokens.device.type == "cpu" else _POOL_CHUNK_ELEMENTS_GPU
    step = max(1, chunk // max(1, b * d))
    total = torch.zeros(b, d, dtype=torch.float32, device=tokens.device)
    for i in range(0, n, step):
        total = total + tokens[:, i:i + step].float().sum(dim=1)
    mean = total / n
    sq = torch.zeros_like(mean)
    for i in range(0, n, step):  # two passes: E[(x - mean)^2] does not cancel like E[x^2] - mean^2
        sq = sq + (tokens[:, i:i + step].float() - mean[:, None]).square().sum(dim=1)
    # clamp: sqrt's gradient at exactly 0 variance would be inf; the clamp makes it 0 instead.
    std = (sq / n).clamp_min(1e-12).sqrt()
    return torch.cat([mean, std], dim=1)


class BlockRouter(nn.Module):
    """Logits for every block from timestep, pooled content and (optionally) pooled text.

    logits = prior(t) + fc2(SiLU(fc1(features))) + bias. ``fc2`` starts at zero, so a fresh router's logits are
    exactly ``bias`` (+ the prior): a static schedule or the block-contribution prior seeds it, and training learns
    the input-dependent part on top. The prior (format 2) is a table of logits at ``prior_timesteps``, linear in
    between: a per-phase static schedule's order, written in once, that the MLP corrects per input.
    """

    def __init__(self, spec: RouterSpec, init_bias: float | Sequence[float] | torch.Tensor = 4.0) -> None:
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(spec.features, spec.hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(spec.hidden, spec.num_blocks, bias=False)
        nn.init.zeros_(self.fc2.weight)
        # Default 4.0: sigmoid 0.98, so an untrained router runs every block at threshold 0.5.
        self.bias = nn.Parameter(_per_block(init_bias, spec.num_blocks, "init_bias"))
        if spec.prior_knots:
            self.prior_timesteps = nn.Parameter(torch.linspace(0.0, 1000.0, spec.prior_knots), requires_grad=False)
            self.prior_logits = nn.Parameter(torch.zeros(spec.prior_knots, spec.num_blocks))
        if spec.layer_norm and spec.token_input:
            self.token_norm = nn.LayerNorm(2 * spec.dim)
        if spec.layer_norm and spec.text_dim:
            self.text_norm = nn.LayerNorm(spec.text_dim)

    def set_prior(self, timesteps: Sequence[float] | torch.Tensor, logits: torch.Tensor) -> None:
        """Write the prior table: ``logits`` [K, N] at ``timesteps`` [K] (any order; stored ascending)."""
        if not self.spec.prior_knots:
            raise ValueError("this router has no prior (RouterSpec.prior_knots = 0)")
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
        v = torch.as_tensor(logits, dtype=torch.float32)
        if t.shape != (self.spec.prior_knots,) or v.shape != (self.spec.prior_knots, self.spec.num_blocks):
            raise ValueError(f"prior must be [{self.spec.prior_knots}] timesteps and [{self.spec.prior_knots}, "
                             f"{self.spec.num_blocks}] logits, got {list(t.shape)} and {list(v.shape)}")
        order = torch.argsort(t)
        with torch.no_grad():
            self.prior_timesteps.copy_(t[order])
            self.prior_logits.copy_(v[order])

    def prior(self, timestep: torch.Tensor, batch: int) -> torch.Tensor | float:
        """The prior's logits [B, N] at ``timestep`` (0.0 for a router without one)."""
        if not self.spec.prior_knots:
            return 0.0
        t = torch.as_tensor(timestep, device=self.prior_logits.device).reshape(-1)
        p = interpolate_prior(t, self.prior_timesteps.float(), self.prior_logits.float())
        return p.expand(batch, -1) if p.shape[0] == 1 and batch > 1 else p

    def features(self, timestep: torch.Tensor, tokens: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP input [B, features] in float32. A scalar or [1] timestep is broadcast to the batch."""
        spec = self.spec
        if tokens.ndim != 3 or tokens.shape[2] != spec.dim:
            raise ValueError(f"router expects tokens [batch, tokens, {spec.dim}], got {list(tokens.shape)}")
        b = tokens.shape[0]
        t = sample_timesteps(torch.as_tensor(timestep, device=tokens.device))
        if spec.time_code == "fourier":
            temb = fourier_time_code(t, spec.freq_dim)
        else:
            temb = timestep_embedding(t, spec.freq_dim)
        if temb.shape[0] == 1 and b > 1:
            temb = temb.expand(b, -1)
        if temb.shape[0] != b:
            raise ValueError(f"router got {temb.shape[0]} timesteps for a batch of {b}")
        parts = [temb]
        if spec.token_input:
            pooled = pool_tokens(tokens)
            parts.append(self.token_norm(pooled) if spec.layer_norm else pooled)
        if spec.text_dim > 0:  # a router without text input ignores any text it is given
            if text is None:
                raise ValueError(f"this router was trained with text input ({spec.text_dim}-d); pass the text context")
            if text.ndim != 3 or text.shape[0] != b or text.shape[2] != spec.text_dim or text.shape[1] == 0:
                raise ValueError(f"router expects text [{b}, tokens, {spec.text_dim}], got {list(text.shape)}")
            pooled_text = text.float().mean(dim=1)
            parts.append(self.text_norm(pooled_text) if spec.layer_norm else pooled_text)
        return torch.cat(parts, dim=1)

    def hidden_preactivations(self, timestep: torch.Tensor, tokens: torch.Tensor,
                              text: torch.Tensor | None = None) -> torch.Tensor:
        """fc1's output [B, hidden] (before the SiLU): what the router health check reads."""
        return self.fc1(self.features(timestep, tokens, text).to(self.fc1.weight.dtype)).float()

    def forward(self, timestep: torch.Tensor, tokens: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, num_blocks], float32."""
        x = self.features(timestep, tokens, text).to(self.fc1.weight.dtype)
        out = (self.fc2(self.act(self.fc1(x))) + self.bias).float()
        return out + self.prior(sample_timesteps(torch.as_tensor(timestep)), x.shape[0])

    def macs(self, tokens: int) -> int:
        """Rough MACs of one call at ``tokens`` tokens (pooling counted as 2 per element), batch 1."""
        s = self.spec
        pooling = 2 * tokens * s.dim if s.token_input else 0
        return pooling + s.features * s.hidden + s.hidden * s.num_blocks + s.prior_knots

    @classmethod
    def constant(cls, spec: RouterSpec, logits_per_block: Sequence[float] | torch.Tensor) -> "BlockRouter":
        """A router whose logits are exactly ``logits_per_block`` whatever the (finite) input."""
        router = cls(spec, init_bias=logits_per_block)
        with torch.no_grad():
            router.fc1.weight.zero_()
            router.fc1.bias.zero_()
        return router

    @classmethod
    def timestep_switch(
        cls,
        spec: RouterSpec,
        boundary: float,
        early_logits: Sequence[float] | torch.Tensor,
        late_logits: Sequence[float] | torch.Tensor,
    ) -> "BlockRouter":
        """A hand-set router: ``early_logits`` for timesteps above ``boundary`` (early, noisy steps), else
        ``late_logits``, whatever the content.

        Exact up to float rounding (within 1% of |early - late|) for timesteps at least 0.5 from ``boundary``.
        It reads the lowest-frequency sin feature, which is monotonic on [0, 1000], and builds a step from
        SiLU(a) - SiLU(a - 1) with a steep ``a``. Needs ``hidden >= 2`` and ``freq_dim >= 8``.
        """
        half = spec.freq_dim // 2
        f_min = 10000.0 ** (-(half - 1) / half)
        if spec.time_code != "sinusoidal":
            raise ValueError("timestep_switch reads Wan's sinusoidal timestep embedding (time_code 'sinusoidal')")
        if spec.hidden < 2 or 1000.0 * f_min >= math.pi / 2:  # the sin feature must not turn over on [0, 1000]
            raise ValueError("timestep_switch needs a spec with hidden >= 2 and freq_dim >= 8")
        early = _per_block(early_logits, spec.num_blocks, "early_logits")
        late = _per_block(late_logits, spec.num_blocks, "late_logits")
        # Slope so that 0.5 timestep units move the step input by 30 (SiLU saturates well before that).
        k = 30.0 / (0.5 * f_min * math.cos(1000.0 * f_min))
        s_b = math.sin(boundary * f_min)
        router = cls(spec, init_bias=late)
        with torch.no_grad():
            router.fc1.weight.zero_()
            router.fc1.bias.zero_()
            router.fc2.weight.zero_()
            router.fc1.weight[0, spec.freq_dim - 1] = k
            router.fc1.weight[1, spec.freq_dim - 1] = k
            router.fc1.bias[0] = -k * s_b
            router.fc1.bias[1] = -k * s_b - 1.0
            router.fc2.weight[:, 0] = early - late
            router.fc2.weight[:, 1] = late - early
        return router


def _per_block(values: float | Sequence[float] | torch.Tensor, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).detach().clone()
    if t.ndim == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"{what} must have one value per block ({n}), got shape {list(t.shape)}")
    return t


def _check_fraction(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


# ---------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class RoutingPolicy:
    """How logits become decisions.

    ``threshold`` set: block i runs iff sigmoid(logit_i) > threshold (``budget`` is then ignored).
    Otherwise ``budget`` < 1 spends that fraction of the block compute (see ``decide``); 1.0 runs all.
    Pinned blocks (the first ``pin_first``, the last ``pin_last`` and ``pinned``) always run.
    """

    budget: float = 1.0
    threshold: float | None = None
    pin_first: int = 0
    pin_last: int = 0
    pinned: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_fraction("budget", self.budget)
        if self.threshold is not None:
            _check_fraction("threshold", self.threshold)
        for name in ("pin_first", "pin_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.pinned):
            raise ValueError(f"pinned must be non-negative block indices, got {self.pinned!r}")

    @property
    def runs_everything(self) -> bool:
        """True when no router call is needed: every block runs regardless of the logits."""
        return self.threshold is None and self.budget >= 1.0

    def pin_mask(self, num_blocks: int) -> torch.Tensor:
        """Bool [num_blocks]: the blocks that always run."""
        bad = [i for i in self.pinned if i >= num_blocks]
        if bad:
            raise ValueError(f"pinned block(s) {bad} out of range for a model with {num_blocks} blocks (0-{num_blocks - 1})")
        mask = torch.zeros(num_blocks, dtype=torch.bool)
        mask[: min(self.pin_first, num_blocks)] = True
        if self.pin_last:
            mask[max(0, num_blocks - self.pin_last):] = True
        mask[list(self.pinned)] = True
        return mask


@dataclass(frozen=True)
class DecisionTensors:
    """The constant inputs of ``decide`` for one model and device: pinned blocks and normalised costs.

    Made once (per run, per device) so a model call copies nothing from the host.
    """

    pinned: torch.Tensor  # bool [N]
    costs: torch.Tensor  # [N], sums to 1; float64 (float32 on MPS, which has no float64)

    @classmethod
    def make(cls, policy: RoutingPolicy, costs: Sequence[float] | torch.Tensor | None, num_blocks: int,
             device: torch.device | str = "cpu") -> "DecisionTensors":
        device = torch.device(device)
        c = _costs(costs, num_blocks)
        c = (c / c.sum()).to(torch.float64 if device.type != "mps" else torch.float32)
        return cls(pinned=policy.pin_mask(num_blocks).to(device), costs=c.to(device))


def decide(
    logits: torch.Tensor,
    policy: RoutingPolicy,
    costs: Sequence[float] | torch.Tensor | None = None,
    prepared: DecisionTensors | None = None,
) -> torch.Tensor:
    """Bool [B, N] run-mask, one row per sample (CFG halves may differ), deterministic.

    Budget rule (threshold None, budget < 1): with c_i = cost_i / sum(cost), the pinned blocks always run;
    the others are ranked by descending logit (ties: lower index first) and taken in that order while
    pinned cost + taken cost <= budget (tolerance 1e-9, or 1e-6 where float64 is unavailable); the first
    block that does not fit stops the walk, so a run block never has a lower logit than a skipped one.
    Pinned blocks may alone exceed the budget. ``costs`` default to equal (budget = fraction of blocks);
    they are host numbers (list or CPU tensor), e.g. ``[m.total for m in compute.model_block_macs(...)]``.
    ``prepared`` (from ``DecisionTensors.make`` for the same policy and costs, on the logits' device)
    replaces ``costs`` and saves the host-to-device copies.

    Runs on the logits' device without a host sync; reading the mask back (e.g. to skip a block in
    Python) is the one sync per model call.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, num_blocks], got {list(logits.shape)}")
    b, n = logits.shape
    device = logits.device
    if prepared is None:
        prepared = DecisionTensors.make(policy, costs, n, device)
    if prepared.pinned.shape != (n,) or prepared.costs.shape != (n,):
        raise ValueError(f"prepared decision tensors are for {prepared.pinned.shape[0]} blocks, logits have {n}")
    pinned = prepared.pinned
    if policy.threshold is not None:
        return pinned | (torch.sigmoid(logits.float()) > policy.threshold)
    if policy.budget >= 1.0:
        return torch.ones(b, n, dtype=torch.bool, device=device)

    c = prepared.costs
    eps = 1e-9 if c.dtype == torch.float64 else 1e-6
    pinned_cost = (c * pinned).sum()
    # NaN logits rank last (as -inf) so a broken input never buys compute.
    score = torch.nan_to_num(logits.float(), nan=-math.inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # stable: ties keep lower index first
    extra = (c * ~pinned)[order]  # pinned blocks add nothing here; they are paid for up front
    fits = (pinned_cost + extra.cumsum(dim=1)) <= policy.budget + eps
    take = fits.to(torch.uint8).cummin(dim=1).values.bool()  # stop at the first block that does not fit
    run = torch.zeros(b, n, dtype=torch.bool, device=device).scatter(1, order, take)
    return run | pinned


def _costs(costs: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor:
    if costs is None:
        return torch.ones(n, dtype=torch.float64)
    # Checked as host numbers: a list (what the routing hook passes) is validated without any tensor read.
    if torch.is_tensor(costs):
        if costs.ndim != 1:
            raise ValueError(f"costs must have one value per block ({n}), got shape {list(costs.shape)}")
        costs = costs.detach().to("cpu", torch.float64).tolist()
    values = [float(v) for v in costs]
    if len(values) != n:
        raise ValueError(f"costs must have one value per block ({n}), got shape [{len(values)}]")
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"block costs must be finite, non-negative and not all zero, got {values[:8]}")
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- files


def save_router(path: str | os.PathLike, router: BlockRouter) -> None:
    """Write the router's weights and spec as safetensors (atomically)."""
    sd = {k: v.detach().to("cpu") for k, v in router.state_dict().items()}
    expected = router.spec.tensor_shapes()
    if set(sd) != set(expected):
        raise PareFormatError(f"{path}: router state dict has keys {sorted(sd)}, expected {sorted(expected)}")
    meta = {METADATA_KEY: json.dumps(router.spec.to_json(), separators=(",", ":")), "format": "pt"}
    save_atomic(path, sd, meta)


def read_router_spec(path: str | os.PathLike) -> RouterSpec:
    """Validate a router file's header (metadata, tensor names, shapes, dtypes) without loading tensors."""
    path = str(path)
    entries, metadata = read_header(path)
    if METADATA_KEY not in metadata:
        what = "a PARE model checkpoint" if "pare" in metadata else "a safetensors file without router metadata"
        raise PareFormatError(
            f"{path}: not a PARE router file ({what}; no '{METADATA_KEY}' header key). Routers are written by "
            "the training pipeline's export step"
        )
    try:
        obj = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise PareFormatError(f"{path}: router metadata is not valid JSON ({e})") from e
    spec = RouterSpec.from_json(obj, source=path)
    expected = spec.tensor_shapes()
    missing = [k for k in expected if k not in entries]
    if missing:
        raise PareFormatError(f"{path}: router tensor '{missing[0]}' is missing (expected shape {list(expected[missing[0]])})")
    extra = [k for k in entries if k not in expected]
    if extra:
        raise PareFormatError(f"{path}: unexpected tensor '{extra[0]}' in a router file (expected {sorted(expected)})")
    for key, want in expected.items():
        found = tuple(entries[key].get("shape", ()))
        if found != want:
            raise shape_error(path, key, want, found, "disagrees with the router metadata")
        dtype = entries[key].get("dtype")
        if dtype not in _FLOAT_DTYPES:
            raise PareFormatError(f"{path}: router tensor '{key}' has dtype {dtype}; router weights are floating point")
    return spec


def load_router(path: str | os.PathLike) -> BlockRouter:
    """Load and validate a router file; the router comes back in float32 on the CPU, in eval mode."""
    spec = read_router_spec(path)
    tensors, _ = load_tensors(path, list(spec.tensor_shapes()))
    _check_finite_weights(str(path), tensors)
    router = BlockRouter(spec)
    router.load_state_dict({k: v.float() for k, v in tensors.items()})
    return router.eval()


def check_router_fits(
    spec: RouterSpec,
    num_blocks: int,
    dim: int,
    fingerprint: str | None = None,
    source: str = "",
    text_dim: int | None = None,
) -> None:
    """Raise PareFormatError if a router cannot drive this model; warn if it was trained for another one.

    ``text_dim`` (optional) is the width of the text context the caller will pass.
    """
    name = f"router {source}" if source else "router"
    if spec.num_blocks != num_blocks:
        raise PareFormatError(f"{name} was trained for {spec.num_blocks} blocks but the model has {num_blocks}")
    if spec.dim != dim:
        raise PareFormatError(
            f"{name} reads {spec.dim}-wide tokens (feature size {spec.features}) but the model's dim is {dim}; "
            "it was trained for another model size"
        )
    if text_dim is not None and spec.text_dim and spec.text_dim != text_dim:
        raise PareFormatError(f"{name} reads {spec.text_dim}-wide text but the model gives {text_dim}-wide text")
    if fingerprint and spec.model_fingerprint and fingerprint != spec.model_fingerprint:
        # Same shape, different pruning: it runs, but its decisions were learned for other widths.
        logger.warning(
            "%s was trained for model %s but this model is %s (same block count and dim); decisions may be off",
            name, spec.model_fingerprint, fingerprint,
        )
