"""The Wan2.1 diffusion transformer (T2V and I2V) in plain torch, with per-block widths and per-sample block skipping.

Same math as ComfyUI 0.3.75's ``comfy/ldm/wan/model.py`` (``WanModel``), written for training and for reference
outputs outside ComfyUI. Parameter names follow the original Wan key layout, so a (pruned) checkpoint loads
strictly. What differs from the teacher is only the width of each block's self-attention (its kept heads, each of
the teacher's head dim; ``norm_q``/``norm_k`` are RMSNorms over the whole kept inner width) and of its FFN.

Decomposed so training can reach inside: ``prepare`` (embeddings, RoPE, modulation), ``blocks[i](x, e, freqs,
context, context_img_len)``, ``finish`` (head + unpatchify); ``patch_embed`` gives the router's content tokens.
Not covered (not Wan2.1 T2V/I2V): VACE, camera/reference convs, FLF position embeddings, ComfyUI's rope_options.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comfyui_pare.errors import PareFormatError
from comfyui_pare.model_family import token_grid
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import CLIP_DIM, FREQ_DIM, BlockWidth, WanDims
from comfyui_pare.wan_reader import WanReader, open_wan

logger = logging.getLogger(__name__)

EPS = 1e-6
ROPE_THETA = 10000.0
Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [L, head_dim // 2], float32


def sinusoidal_embedding(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """Wan's timestep embedding [B, dim] in float32: [cos | sin] of t * 10000^(-i / half)."""
    half = dim // 2
    t = t.reshape(-1).to(torch.float32)
    angles = torch.outer(t, torch.pow(10000, -torch.arange(half).to(t).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_freqs(grid: tuple[int, int, int], head_dim: int, device: torch.device | None = None) -> Rope:
    """3-axis RoPE over (frame, row, column) positions of a token grid, flattened in that order.

    Axis widths [d - 4(d//6), 2(d//6), 2(d//6)] of the head dim, theta 10000; angles in float64 then float32,
    as ComfyUI's ``EmbedND``/``rope`` compute them.
    """
    d = head_dim
    axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij"), -1)
    pos = pos.reshape(-1, 3)
    angles = []
    for i, a in enumerate(axes):
        omega = 1.0 / ROPE_THETA ** torch.linspace(0, (a - 2) / a if a else 0, steps=a // 2, dtype=torch.float64)
        angles.append(pos[:, i:i + 1] * omega)
    ang = torch.cat(angles, dim=1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x: torch.Tensor, freqs: Rope) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, L, heads, head_dim] by the per-token angles (in float32)."""
    cos, sin = (f[None, :, None] for f in freqs)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on [B, L, heads * d] (or [B, L, heads, d]) inputs; returns [B, Lq, heads * d]."""
    b, lq = q.shape[:2]
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, -1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=EPS)  # Wan's norm1/norm2/head norm: no affine


class SelfAttention(nn.Module):
    """Self-attention over ``num_heads`` heads (a pruned block keeps fewer) of the teacher's head dim."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)
        # Over the whole inner width, not per head (Wan's qk-norm): pruning heads changes each token's RMS.
        self.norm_q, self.norm_k = nn.RMSNorm(inner, eps=EPS), nn.RMSNorm(inner, eps=EPS)

    def forward(self, x: torch.Tensor, freqs: Rope) -> torch.Tensor:
        b, s = x.shape[:2]
        q = apply_rope(self.norm_q(self.q(x)).view(b, s, self.num_heads, self.head_dim), freqs)
        k = apply_rope(self.norm_k(self.k(x)).view(b, s, self.num_heads, self.head_dim), freqs)
        return self.o(attention(q, k, self.v(x), self.num_heads))


class CrossAttention(nn.Module):
    """Cross-attention to the text (T2V), plus a second branch over the CLIP image tokens (I2V)."""

    def __init__(self, dim: int, num_heads: int, image: bool) -> None:
        super().__init__()
        self.num_heads, self.image = num_heads, image
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=EPS), nn.RMSNorm(dim, eps=EPS)
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img_len: int | None) -> torch.Tensor:
        q = self.norm_q(self.q(x))
        if not self.image:
            return self.o(attention(q, self.norm_k(self.k(context)), self.v(context), self.num_heads))
        # Image tokens come first. Without them (context_img_len None) ComfyUI's slicing hands the image branch
        # the text context too; we keep that behaviour so outputs match.
        img, txt = (context[:, :context_img_len], context[:, context_img_len:]) if context_img_len else (context, context)
        out = attention(q, self.norm_k(self.k(txt)), self.v(txt), self.num_heads)
        out = out + attention(q, self.norm_k_img(self.k_img(img)), self.v_img(img), self.num_heads)
        return self.o(out)


class WanBlock(nn.Module):
    """One Wan2.1 block: modulated self-attention, cross-attention, modulated GELU(tanh) FFN, gated residuals."""

    def __init__(self, dims: WanDims, width: BlockWidth) -> None:
        super().__init__()
        d = dims.dim
        self.self_attn = SelfAttention(d, width.num_heads, dims.head_dim)
        self.norm3 = nn.LayerNorm(d, eps=EPS)
        self.cross_attn = CrossAttention(d, dims.num_heads, dims.variant == "i2v")
        self.ffn = nn.Sequential(nn.Linear(d, width.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(width.ffn_dim, d))
        self.modulation = nn.Parameter(torch.empty(1, 6, d))

    def forward(self, x: torch.Tensor, e: torch.Tensor, freqs: Rope, context: torch.Tensor,
                context_img_len: int | None = None) -> torch.Tensor:
        """x [B, L, dim], e [B, 6, dim] (time projection), context [B, Lc, dim] -> [B, L, dim]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.to(x.dtype) + e).unsqueeze(2).unbind(1)
        x = x + self.self_attn(_layer_norm(x) * (1 + scale1) + shift1, freqs) * gate1
        x = x + self.cross_attn(self.norm3(x), context, context_img_len)
        return x + self.ffn(_layer_norm(x) * (1 + scale2) + shift2) * gate2


@dataclass
class Prepared:
    """Everything the blocks and the head need, computed once per forward."""

    tokens: torch.Tensor  # [B, L, dim], input to block 0
    e: torch.Tensor  # [B, 6, dim]: per-block modulation before each block's own table is added
    e_head: torch.Tensor  # [B, dim]: time embedding, for the head's 2-vector modulation
    freqs: Rope
    context: torch.Tensor  # [B, (257 +) Lt, dim]
    context_img_len: int | None
    grid: tuple[int, int, int]  # token grid (frames, rows, columns)
    size: tuple[int, int, int]  # latent (F, H, W) before padding to the patch size


class WanTransformer(nn.Module):
    """Wan2.1 T2V/I2V transformer built from a ``PrunedWanMeta`` (a teacher is the 0%-pruned case)."""

    def __init__(self, meta: PrunedWanMeta) -> None:
        super().__init__()
        self.meta = meta
        dims = self.dims = meta.dims
        if dims.spec.extra_modules and dims.spec.extra_modules != ("img_emb.",):
            raise PareFormatError(f"the training toolkit builds main-block Wans only; a {dims.spec.title} teacher "
                                  f"also has {', '.join(dims.spec.extra_modules)} (prune it with `python -m "
                                  "comfyui_pare prune` from a plan instead)")
        d = dims.dim
        patch = dims.spec.patch_size
        self.patch_embedding = nn.Conv3d(dims.in_dim, d, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(nn.Linear(dims.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(dims, w) for w in meta.blocks)
        self.head = nn.Module()
        self.head.head = nn.Linear(d, dims.out_dim * dims.spec.patch_volume)
        self.head.modulation = nn.Parameter(torch.empty(1, 2, d))
        if dims.variant == "i2v":  # MLPProj: its LayerNorms keep torch's default eps (1e-5) and exact GELU
            self.img_emb = nn.Module()
            self.img_emb.proj = nn.Sequential(nn.LayerNorm(CLIP_DIM), nn.Linear(CLIP_DIM, CLIP_DIM), nn.GELU(),
                                              nn.Linear(CLIP_DIM, d), nn.LayerNorm(d))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], meta: PrunedWanMeta, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "WanTransformer":
        """Build and load strictly (original key layout, no prefix). Tensors needing no conversion are shared with
        ``sd``. The patch embedding stays float32 whatever ``dtype`` (ComfyUI runs it in float32)."""
        with torch.device("meta"):
            model = cls(meta)
        conv = {k: v.to(device=device, dtype=torch.float32 if k.startswith("patch_embedding.") else dtype)
                for k, v in sd.items()}
        model.load_state_dict(conv, strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "WanTransformer":
        """Load a (pruned or plain) Wan2.1 checkpoint in any layout ``comfyui_pare.wan_reader`` reads."""
        with open_wan(path) as reader:
            return cls.from_reader(reader, dtype=dtype, device=device)

    @classmethod
    def from_reader(cls, reader: WanReader, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> "WanTransformer":
        """Load strictly from an open checkpoint, one tensor at a time, each converted to ``dtype`` (None: as stored,
        scaled fp8 dequantized to float32) and moved to ``device`` before the next is read: the model exists once, in
        the dtype and on the device it runs in, never as a whole state dict beside it (a float32 file loaded in bf16
        peaks at the bf16 model plus one float32 tensor). The patch embedding stays float32, as in
        ``from_state_dict``."""
        with torch.device("meta"):
            model = cls(reader.meta)
        for key in reader.keys():
            module_name, _, name = key.rpartition(".")
            try:
                owner = model.get_submodule(module_name)
                old = owner._parameters[name]
            except (AttributeError, KeyError):
                raise PareFormatError(f"{reader.path}: tensor '{key}' is not a parameter of this Wan model") from None
            rows = reader.shape(key)[0] if reader.shape(key) else 1
            t = reader.rows(key, 0, rows).reshape(old.shape)
            t = t.to(device=device, dtype=torch.float32 if key.startswith("patch_embedding.") else dtype)
            owner._parameters[name] = nn.Parameter(t, requires_grad=old.requires_grad)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise PareFormatError(f"{reader.path}: no tensor for {len(left)} parameter(s), e.g. '{left[0]}'")
        return model.eval()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latent [B, C_in, F, H, W] -> tokens [B, L, dim] (the router's content input), in float32 like ComfyUI.

        H and W are padded circularly to the patch size first, as ComfyUI does.
        """
        pad = [p for i in (2, 1, 0) for p in (0, -x.shape[2 + i] % self.dims.spec.patch_size[i])]
        x = F.pad(x, pad, mode="circular") if any(pad) else x
        return self.patch_embedding(x.float()).flatten(2).transpose(1, 2)

    def prepare(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None) -> Prepared:
        """Embeddings, time modulation and RoPE for one forward; compute dtype is the text embedding's."""
        dtype = self.text_embedding[0].weight.dtype
        f, h, w = x.shape[2:]
        grid = token_grid((f, h, w), self.dims.spec.patch_size)
        tokens = WanTransformer.patch_embed(self, x).to(dtype)
        e_head = self.time_embedding(sinusoidal_embedding(timestep).to(dtype))
        e = self.time_projection(e_head).unflatten(1, (6, self.dims.dim))
        if e.shape[0] == 1 and x.shape[0] > 1:  # one timestep for the whole batch: rows must be indexable
            e, e_head = e.expand(x.shape[0], -1, -1), e_head.expand(x.shape[0], -1)
        ctx = self.text_embedding(context.to(dtype))
        img_len = None
        if clip_fea is not None:
            if self.dims.variant == "i2v":
                ctx = torch.cat([self.img_emb.proj(clip_fea.to(dtype)), ctx], dim=1)
            img_len = clip_fea.shape[-2]
        freqs = rope_freqs(grid, self.dims.head_dim, device=x.device)
        return Prepared(tokens, e, e_head, freqs, ctx, img_len, grid, (f, h, w))

    def finish(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        """Head (2-vector modulation) and unpatchify: [B, L, dim] -> [B, out_dim, F, H, W]."""
        shift, scale = (self.head.modulation.to(x.dtype) + p.e_head[:, None, None]).unbind(2)
        x = self.head.head(_layer_norm(x) * (1 + scale) + shift)
        b, c, (pf, ph, pw) = x.shape[0], self.dims.out_dim, self.dims.spec.patch_size
        x = x.view(b, *p.grid, pf, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, c, p.grid[0] * pf, p.grid[1] * ph, p.grid[2] * pw)
        return x[:, :, :p.size[0], :p.size[1], :p.size[2]]

    def run_block(self, i: int, x: torch.Tensor, p: Prepared, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``i`` on all rows, or only on ``rows`` (long indices; the other rows pass through unchanged)."""
        block = self.blocks[i]
        if rows is None:
            return block(x, p.e, p.freqs, p.context, p.context_img_len)
        out = block(x[rows], p.e[rows], p.freqs, p.context[rows], p.context_img_len)
        return x.index_copy(0, rows, out)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, block_mask: torch.Tensor | None = None,
                return_hidden_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity [B, out_dim, F, H, W] for latent x [B, C_in, F, H, W] at ``timestep`` [B] (= sigma * 1000).

        ``block_mask`` [B, N] bool: False skips block i for that sample (identity); a block runs on exactly the
        rows that need it (one host read of the mask per call). ``return_hidden_states`` also returns the N + 1
        token states: the input of every block, then the last block's output.
        """
        # The class's own methods: under FSDP2, training.parallel registers prepare/finish/patch_embed as forward
        # methods (for callers outside forward); inside forward the root's parameters are already gathered.
        p = WanTransformer.prepare(self, x, timestep, context, clip_fea)
        plan = self.row_plan(block_mask, x.shape[0], x.device)
        h, states = p.tokens, []
        for i, rows in enumerate(plan):
            states.append(h)
            if rows is None or rows.numel():  # None: every row; empty: the block is skipped for all of them
                h = self.run_block(i, h, p, rows)
        out = WanTransformer.finish(self, h, p)
        return (out, states + [h]) if return_hidden_states else out

    def row_plan(self, block_mask: torch.Tensor | None, batch: int,
                 device: torch.device | None = None) -> list[torch.Tensor | None]:
        """Per block: None (all rows run it, the unmasked fast path) or the long indices of the rows that do."""
        if block_mask is None:
            return [None] * self.num_blocks
        if block_mask.shape != (batch, self.num_blocks) or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be a bool tensor [{batch}, {self.num_blocks}], "
                             f"got {block_mask.dtype} {list(block_mask.shape)}")
        m = block_mask.cpu()
        return [None if bool(col.all()) else col.nonzero().flatten().to(device) for col in m.T]
