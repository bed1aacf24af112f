"""Bench settings: one dataclass, three profiles (quick, the CPU default, cuda)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from comfyui_pare.wan import WAN21_1_3B, WanDims

# 1.3B width (dim 1536, 12 heads of 128, FFN 8960) at reduced depth; text dim 4096 so the stock loader reads it.
MEASURED_CPU = WanDims(dim=1536, num_heads=12, ffn_dim=8960, num_layers=4, text_dim=4096)
MEASURED_QUICK = WanDims(dim=256, num_heads=2, ffn_dim=1024, num_layers=4, text_dim=4096)


@dataclass(frozen=True)
class MeasuredShape:
    """What the measured suites sample: latent size (frames x height x width, in latent pixels), steps, CFG."""

    latent: tuple[int, int, int] = (2, 16, 16)  # -> 2 x 8 x 8 = 128 video tokens after the (1, 2, 2) patching
    text_tokens: int = 32
    steps: int = 2
    cfg: float = 5.0  # > 1: cond and uncond batched, as in a real CFG workflow
    shift: float = 5.0

    @property
    def tokens(self) -> int:
        f, h, w = self.latent
        return f * -(-h // 2) * -(-w // 2)


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    suites: tuple[str, ...] = ("compute", "measured")  # compile: --suite compile (inductor builds for minutes)
    dims: WanDims = MEASURED_CPU
    shape: MeasuredShape = field(default_factory=MeasuredShape)
    head_fraction: float = 0.5  # the pruned student keeps this share of each block's heads ...
    ffn_fraction: float = 0.7  # ... and of its FFN neurons
    budgets: tuple[float, ...] = (1.0, 0.75, 0.5)  # the time curve (PARE Apply Router, budget mode)
    routed_budget: float = 0.5  # the fixed decision set of "pruned + routed" and "teacher + routed"
    repeats: int = 5
    warmup: int = 1
    threads: int = 0  # 0: torch's default
    compile_backend: str = "inductor"
    compile_steps: int = 4
    weights_dtype: str = "float32"  # of the bench checkpoints (bfloat16 for the full-depth GPU model)
    seed: int = 0
    quick: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"]["tokens"] = self.shape.tokens
        return d


def profile(name: str) -> BenchConfig:
    """'default' (this 2-core CPU, minutes), 'quick' (seconds: narrow model, no compile), 'cuda' (full depth)."""
    if name == "default":
        return BenchConfig()
    if name == "quick":
        return BenchConfig(suites=("compute", "measured"), dims=MEASURED_QUICK,
                           shape=MeasuredShape(latent=(1, 8, 8), text_tokens=8, steps=2), repeats=2, quick=True)
    if name == "cuda":
        # Wan2.1-1.3B at full depth, 81 frames at 480x832 (32,760 tokens); ComfyUI picks the GPU's dtype.
        return BenchConfig(device="cuda", dims=replace(WAN21_1_3B, text_dim=4096),
                           shape=MeasuredShape(latent=(21, 60, 104), text_tokens=512, steps=2), repeats=3,
                           weights_dtype="bfloat16")
    raise ValueError(f"unknown bench profile {name!r}; use default, quick or cuda")
