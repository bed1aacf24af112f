"""Wan transformer facts: dimensions and the original checkpoint key layout (Wan2.1 blocks, which every Wan
family reuses; what differs between families is in ``model_family``).

Everything here is plain data about the architecture (no torch modules), so the checkpoint format, the
surgery, the compute accounting and the ComfyUI model builder all agree on one description of a block.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping

from .model_family import FAMILIES, WanFamily, family_for

VARIANTS = ("t2v", "i2v")  # the blocks' cross-attention: text only, or text + CLIP image
FREQ_DIM = 256
CLIP_DIM = 1280  # I2V image tokens come from CLIP ViT-H (257 tokens x 1280)
CLIP_TOKENS = 257
TEXT_TOKENS = 512
DEFAULT_HEAD_DIM = 128  # what ComfyUI assumes for a file without PARE metadata

# Prefixes other tools put in front of the diffusion model's keys.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# diffusers' WanTransformer3DModel module names -> original Wan2.1 module names, inside ``blocks.N.`` and outside
# the blocks. diffusers' block ``norm2`` is the affine cross-attention norm (original ``norm3``); its ``norm1`` /
# ``norm3`` have no parameters. ``scale_shift_table`` is a bare parameter (the modulation table), so its state-dict
# key has no ``.weight`` suffix. Shared by the checkpoint reader and the LoRA parser.
DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "norm2": "norm3", "scale_shift_table": "modulation",
}
DIFFUSERS_GLOBAL = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_DIFFUSERS_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def diffusers_module(name: str) -> str | None:
    """Original module path of a diffusers module path ('blocks.3.attn1.to_q' -> 'blocks.3.self_attn.q'), or None."""
    m = _DIFFUSERS_BLOCK_RE.fullmatch(name)
    if m:
        local = DIFFUSERS_BLOCK.get(m[2])
        return f"blocks.{int(m[1])}.{local}" if local else None
    return DIFFUSERS_GLOBAL.get(name)


def diffusers_key(key: str) -> str | None:
    """Original state-dict key of a diffusers state-dict key, or None if it names no Wan2.1 parameter."""
    module, _, suffix = key.rpartition(".")
    if suffix in ("weight", "bias") and module:
        found = diffusers_module(module)
        if found is not None and not found.endswith("modulation"):
            return f"{found}.{suffix}"
    found = diffusers_module(key)  # bare parameters: the modulation tables
    return found if found is not None and found.endswith("modulation") else None


@dataclass(frozen=True)
class WanDims:
    """The shape of a full-width (teacher) Wan transformer. ``family`` names its ``model_family`` entry; left
    empty it is inferred from the channels (what files written before the family was stored get)."""

    dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    variant: str = "t2v"
    family: str = ""
    vace_layers: int = 0  # VACE: blocks in the VACE stream (0: none)
    vace_in_dim: int = 0  # VACE: channels into vace_patch_embedding

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Wan variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("dim", "num_heads", "ffn_dim", "num_layers", "text_dim", "in_dim", "out_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Wan dimension {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (3-axis RoPE)")
        if not self.family:
            inferred = family_for(self.in_dim, self.out_dim, self.variant == "i2v", vace=self.vace_layers > 0)
            object.__setattr__(self, "family", inferred.name)
        spec = FAMILIES.get(self.family)
        if spec is None:
            raise ValueError(f"unknown Wan model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if spec.cross_attn != self.variant or spec.out_dim != self.out_dim:
            raise ValueError(f"a {spec.title} model has {spec.cross_attn} blocks and {spec.out_dim} output channels, "
                             f"these dims say {self.variant} and {self.out_dim}")
        vace = any(m.startswith("vace") for m in spec.extra_modules)
        if vace != (self.vace_layers > 0) or (self.vace_layers > 0) != (self.vace_in_dim > 0):
            raise ValueError(f"a {spec.title} model {'needs' if vace else 'has no'} VACE blocks; these dims say "
                             f"vace_layers={self.vace_layers}, vace_in_dim={self.vace_in_dim}")
        if vace and self.num_layers % self.vace_layers:
            raise ValueError(f"VACE: {self.num_layers} main blocks are not a multiple of {self.vace_layers} VACE "
                             "blocks (ComfyUI adds a hint after every num_layers // vace_layers-th block)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def spec(self) -> WanFamily:
        """This model's family: patch size, latent space, extra modules, timestep form."""
        return FAMILIES[self.family]

    @property
    def vace_hint_blocks(self) -> tuple[int, ...]:
        """Main blocks after which the stock VACE forward adds a hint (ComfyUI's ``vace_layers_mapping``)."""
        if not self.vace_layers:
            return ()
        return tuple(range(0, self.num_layers, self.num_layers // self.vace_layers))

    def to_dict(self) -> dict:
        """The dims as stored under 'teacher' (the family is stored beside them; zero VACE sizes are left out, so
        files without VACE read exactly as before)."""
        d = {k: v for k, v in asdict(self).items() if k != "family" and not (k.startswith("vace") and not v)}
        d["head_dim"] = self.head_dim
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "WanDims":
        fields = ("dim", "num_heads", "ffn_dim", "num_layers", "text_dim", "in_dim", "out_dim", "variant")
        missing = [f for f in fields if f not in d]
        if missing:
            raise ValueError(f"teacher dims lack {missing}")
        optional = {f: d[f] for f in ("family", "vace_layers", "vace_in_dim") if f in d}
        dims = cls(**{f: d[f] for f in fields}, **optional)
        if "head_dim" in d and int(d["head_dim"]) != dims.head_dim:
            raise ValueError(f"head_dim {d['head_dim']} disagrees with dim/num_heads = {dims.head_dim}")
        return dims


# The public sizes (docs/method.md).
WAN21_1_3B = WanDims(dim=1536, num_heads=12, ffn_dim=8960, num_layers=30)
WAN21_14B = WanDims(dim=5120, num_heads=40, ffn_dim=13824, num_layers=40)
WAN21_14B_I2V = WanDims(dim=5120, num_heads=40, ffn_dim=13824, num_layers=40, in_dim=36, variant="i2v")
# Wan2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B config.json): 48-channel latents of the 16x Wan2.2 VAE in and out.
WAN22_TI2V_5B = WanDims(dim=3072, num_heads=24, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48)


@dataclass(frozen=True)
class BlockWidth:
    """Widths of one block, in teacher numbering: which self-attention heads and FFN neurons are kept."""

    heads: tuple[int, ...]
    ffn: tuple[int, ...]

    @classmethod
    def full(cls, dims: WanDims) -> "BlockWidth":
        return cls(tuple(range(dims.num_heads)), tuple(range(dims.ffn_dim)))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def ffn_dim(self) -> int:
        return len(self.ffn)


def block_prefix(i: int) -> str:
    return f"blocks.{i}."


def _linear(key: str, out_f: int, in_f: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{key}.weight", (out_f, in_f)
    yield f"{key}.bias", (out_f,)


def block_shapes(dims: WanDims, i: int, width: BlockWidth) -> dict[str, tuple[int, ...]]:
    """Every key of block ``i`` with its expected shape, for the given (possibly pruned) widths."""
    d, inner, ffn = dims.dim, width.num_heads * dims.head_dim, width.ffn_dim
    p = block_prefix(i)
    shapes: dict[str, tuple[int, ...]] = {f"{p}modulation": (1, 6, d)}
    for name in ("q", "k", "v"):
        shapes.update(_linear(f"{p}self_attn.{name}", inner, d))
    shapes.update(_linear(f"{p}self_attn.o", d, inner))
    shapes[f"{p}self_attn.norm_q.weight"] = (inner,)
    shapes[f"{p}self_attn.norm_k.weight"] = (inner,)
    shapes[f"{p}norm3.weight"] = (d,)
    shapes[f"{p}norm3.bias"] = (d,)
    cross = ("q", "k", "v", "o") + (("k_img", "v_img") if dims.variant == "i2v" else ())
    for name in cross:
        shapes.update(_linear(f"{p}cross_attn.{name}", d, d))
    norms = ("norm_q", "norm_k") + (("norm_k_img",) if dims.variant == "i2v" else ())
    for name in norms:
        shapes[f"{p}cross_attn.{name}.weight"] = (d,)
    shapes.update(_linear(f"{p}ffn.0", ffn, d))
    shapes.update(_linear(f"{p}ffn.2", d, ffn))
    return shapes


def vace_shapes(dims: WanDims) -> dict[str, tuple[int, ...]]:
    """The VACE stream's keys at the teacher's widths (ComfyUI's VaceWanAttentionBlock: a text-only Wan block,
    ``before_proj`` on the first, ``after_proj`` on every one), plus ``vace_patch_embedding``."""
    if not dims.vace_layers:
        return {}
    d = dims.dim
    full = BlockWidth.full(dims)
    text_only = WanDims(dim=d, num_heads=dims.num_heads, ffn_dim=dims.ffn_dim, num_layers=1, text_dim=dims.text_dim)
    shapes: dict[str, tuple[int, ...]] = {
        "vace_patch_embedding.weight": (d, dims.vace_in_dim, *dims.spec.patch_size),
        "vace_patch_embedding.bias": (d,),
    }
    for i in range(dims.vace_layers):
        for key, shape in block_shapes(text_only, i, full).items():
            shapes["vace_" + key] = shape
        if i == 0:
            shapes.update(_linear("vace_blocks.0.before_proj", d, d))
        shapes.update(_linear(f"vace_blocks.{i}.after_proj", d, d))
    return shapes


def global_shapes(dims: WanDims) -> dict[str, tuple[int, ...]]:
    """Keys outside the blocks (embeddings, head, I2V image projection) with their shapes."""
    d = dims.dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, dims.in_dim, *dims.spec.patch_size),
        "patch_embedding.bias": (d,),
        "head.modulation": (1, 2, d),
    }
    shapes.update(_linear("text_embedding.0", d, dims.text_dim))
    shapes.update(_linear("text_embedding.2", d, d))
    shapes.update(_linear("time_embedding.0", d, FREQ_DIM))
    shapes.update(_linear("time_embedding.2", d, d))
    shapes.update(_linear("time_projection.1", 6 * d, d))
    shapes.update(_linear("head.head", dims.out_dim * dims.spec.patch_volume, d))
    if dims.variant == "i2v":
        shapes["img_emb.proj.0.weight"] = (CLIP_DIM,)
        shapes["img_emb.proj.0.bias"] = (CLIP_DIM,)
        shapes.update(_linear("img_emb.proj.1", CLIP_DIM, CLIP_DIM))
        shapes.update(_linear("img_emb.proj.3", d, CLIP_DIM))
        shapes["img_emb.proj.4.weight"] = (d,)
        shapes["img_emb.proj.4.bias"] = (d,)
    shapes.update(vace_shapes(dims))
    return shapes


def model_shapes(dims: WanDims, widths: list[BlockWidth]) -> dict[str, tuple[int, ...]]:
    """The full expected key -> shape map of a checkpoint with these per-block widths."""
    shapes = global_shapes(dims)
    for i, width in enumerate(widths):
        shapes.update(block_shapes(dims, i, width))
    return shapes
