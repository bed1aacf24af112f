"""Bench settings: one dataclass; profiles for the CPU (default, quick) and the GPU (1.3B or 14B width, quick)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from comfyui_pare.wan import WAN21_1_3B, WAN21_14B, WanDims

# 1.3B width (dim 1536, 12 heads of 128, FFN 8960) at reduced depth; text dim 4096 so the stock loader reads it.
MEASURED_CPU = WanDims(dim=1536, num_heads=12, ffn_dim=8960, num_layers=4, text_dim=4096)
MEASURED_QUICK = WanDims(dim=256, num_heads=2, ffn_dim=1024, num_layers=4, text_dim=4096)
MODELS = ("1.3b", "14b")
# GPU depths: 1.3B at full depth; 14B width (dim 5120, 40 heads, FFN 13824) at 8 of its 40 blocks, which keeps the
# bench's teacher + student (bf16, about 5.6 + 3.9 GB) and a 75,600-token 720p step inside a 24 GB card.
GPU_BLOCKS = {"1.3b": WAN21_1_3B.num_layers, "14b": 8}
GPU_QUICK_BLOCKS = {"1.3b": 6, "14b": 2}  # --device cuda --quick: the file creation and the runs fit 2 minutes
# Latent frames x height x width of 81 frames (21 latent frames) at Wan's two resolutions: 32,760 / 75,600 tokens.
RESOLUTIONS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}


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
    model: str = "1.3b"  # which Wan2.1 width the measured suites use (MODELS)
    # fp8 rows (fp8_e4m3fn_fast and an fp8_scaled student): None = where fp8 matmuls are supported (CUDA, sm >= 8.9)
    fp8: bool | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"]["tokens"] = self.shape.tokens
        return d


def profile(name: str, model: str = "1.3b", resolution: str = "480p") -> BenchConfig:
    """'default' (this 2-core CPU, minutes), 'quick' (seconds: narrow model, no compile), 'cuda' (full depth for
    1.3B, 8 blocks for 14B; 81 frames at ``resolution``), 'cuda-quick' (a few blocks, 2 rounds: under 2 minutes)."""
    if model not in MODELS:
        raise ValueError(f"unknown bench model {model!r}; use one of {MODELS}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; use one of {tuple(RESOLUTIONS)}")
    if name == "default":
        return BenchConfig() if model == "1.3b" else BenchConfig(dims=replace(WAN21_14B, num_layers=2, text_dim=4096),
                                                                 model=model)
    if name == "quick":
        return BenchConfig(suites=("compute", "measured"), dims=MEASURED_QUICK,
                           shape=MeasuredShape(latent=(1, 8, 8), text_tokens=8, steps=2), repeats=2, quick=True)
    if name in ("cuda", "cuda-quick"):
        # ComfyUI picks the GPU's compute dtype (fp16 or bf16) from the bf16 checkpoints, as for a real Wan file.
        quick = name == "cuda-quick"
        width = WAN21_1_3B if model == "1.3b" else WAN21_14B
        blocks = (GPU_QUICK_BLOCKS if quick else GPU_BLOCKS)[model]
        return BenchConfig(device="cuda", dims=replace(width, num_layers=blocks, text_dim=4096),
                           shape=MeasuredShape(latent=RESOLUTIONS[resolution], text_tokens=512, steps=2),
                           repeats=2 if quick else 3, budgets=(1.0, 0.5) if quick else (1.0, 0.75, 0.5),
                           weights_dtype="bfloat16", quick=quick, model=model)
    raise ValueError(f"unknown bench profile {name!r}; use default, quick, cuda or cuda-quick")
