"""Wan LoRA files: parse every key style in the wild, check the base model, slice for a pruned student.

A LoRA trained on the full teacher patches teacher-shaped weights. A pruned student keeps, per block, some
self-attention heads and FFN neurons (``PrunedWanMeta``), so the LoRA is cut the same way the surgery cuts the
weights: rows of the ``up`` factor (or of a full ``.diff``) for outputs that were dropped, columns of ``down``
for inputs that were dropped. Only ``index_select`` is used, and the rank dimension is never touched, so
alpha / rank (the LoRA scale) is unchanged and the sliced delta is the teacher delta restricted to the kept
entries.

Merge semantics are ComfyUI 0.3.75's (``comfy/lora.py``, ``comfy/weight_adapter/lora.py``), computed in fp32
as ComfyUI's patcher does: delta = strength * (alpha / rank if alpha else 1) * up @ down; a ``.diff`` is
strength * diff and, when a layer has both, ComfyUI keeps only the ``.diff`` (its ``load_lora`` overwrites the
low-rank patch), so we do too; a ``.diff_b`` is strength * diff_b on the bias.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from math import prod
from typing import Mapping

import torch

from .errors import PareFormatError, shape_error
from .pruned import PrunedWanMeta
from .safetensors_io import load_tensors
from .wan import DIFFUSERS_BLOCK, DIFFUSERS_GLOBAL, BlockWidth, WanDims, model_shapes

logger = logging.getLogger(__name__)

# Original Wan2.1 module paths that carry parameters (inside ``blocks.N.`` and outside the blocks).
BLOCK_MODULES = (
    "modulation", "norm3",
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.norm_q", "self_attn.norm_k",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "cross_attn.norm_q", "cross_attn.norm_k", "cross_attn.norm_k_img",
    "ffn.0", "ffn.2",
)
GLOBAL_MODULES = (
    "patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head.head", "head.modulation",
    "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4",
)
# ``lora_unet_`` keys replace every dot by "_", which is ambiguous (ffn_0, norm_k_img, time_projection_1), so they
# are looked up in tables of the known names instead of split blindly. ``lora_unet__`` is Wan-Fun's variant.
_UNDERSCORED_BLOCK = {k.replace(".", "_"): v for k, v in
                      [*((m, m) for m in BLOCK_MODULES), *DIFFUSERS_BLOCK.items()]}
_UNDERSCORED_GLOBAL = {k.replace(".", "_"): v for k, v in
                       [*((m, m) for m in GLOBAL_MODULES), *DIFFUSERS_GLOBAL.items()]}
_UNET_PREFIXES = ("lora_unet__", "lora_unet_")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "")
# Key suffix -> which part of a patch it is. ComfyUI reads all of these; lora_A is the down factor.
_PARTS = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff", "diff"), (".diff_b", "diff_b"), (".dora_scale", "dora_scale"),
    (".diff_m", "diff_m"),
)
# lightx2v's releases name a modulation table's delta after its owner: ``blocks.N.diff_m`` is the ``.diff`` of
# ``blocks.N.modulation`` and ``head.diff_m`` that of ``head.modulation``.
_MODULATION_OWNER_SEPARATORS = (".", "_")  # dotted styles, and lora_unet_ styles
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
# VACE: its blocks keep the teacher's widths, so their patches apply as they are (never sliced).
_VACE_BLOCK_RE = re.compile(r"vace_blocks\.(\d+)\.(.+)")
_VACE_LOCAL = ("before_proj", "after_proj")
VACE_GLOBAL = "vace_patch_embedding"
_NORMS = {"norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
          "cross_attn.norm_k_img", "img_emb.proj.0", "img_emb.proj.4"}
_I2V_ONLY = {"cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img"}
# Linear layers whose *output* (not input) is the model width; used to tell which base a LoRA was trained on.
_DIM_FROM_OUT = {"patch_embedding", "text_embedding.0", "time_embedding.0", "img_emb.proj.3", "ffn.2"}
_NO_DIM_AXIS = {"img_emb.proj.0", "img_emb.proj.1"}  # CLIP width only
_KNOWN_BASES = {1536: "Wan2.1 1.3B", 3072: "Wan2.2 TI2V-5B", 5120: "Wan2.1 14B"}


@dataclass
class LoraPatch:
    """Everything a LoRA file holds for one Wan module (original path, e.g. ``blocks.3.self_attn.q``)."""

    module: str
    up: torch.Tensor | None = None  # [out, rank] (conv: [out, rank, 1, 1, 1])
    down: torch.Tensor | None = None  # [rank, in] (conv: [rank, *kernel])
    alpha: float | None = None
    diff: torch.Tensor | None = None  # full weight delta, weight-shaped
    diff_b: torch.Tensor | None = None  # bias delta
    keys: dict[str, str] = field(default_factory=dict, compare=False)  # part -> key in the source file

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])


@dataclass
class ParsedLora:
    source: str
    patches: dict[str, LoraPatch]
    unmatched: list[str] = field(default_factory=list)  # keys naming no known Wan module (or no LoRA part)
    ignored: list[str] = field(default_factory=list)  # e.g. an .alpha whose module has no low-rank pair
    # Set by ``slice_lora``: teacher modules on blocks a depth-pruned student removed (not applied), and how
    # many patches were cut to the kept heads / FFN neurons.
    dropped: list[str] = field(default_factory=list)
    narrowed: int = 0


def weight_key(module: str) -> str:
    """The state-dict key a module's weight patch lands on (``modulation`` tables are bare parameters)."""
    return module if module.endswith("modulation") else f"{module}.weight"


def bias_key(module: str) -> str:
    return f"{module}.bias"


def base_name(dim: int) -> str:
    return _KNOWN_BASES.get(dim, f"a model with dim {dim}")


def split_block(module: str) -> tuple[int | None, str]:
    """(block index or None, module path inside the block) of an original module path."""
    m = _BLOCK_RE.fullmatch(module)
    return (int(m[1]), m[2]) if m else (None, module)


def _resolve_dotted(name: str) -> str | None:
    m = _BLOCK_RE.fullmatch(name)
    if m:
        local = m[2] if m[2] in BLOCK_MODULES else DIFFUSERS_BLOCK.get(m[2])
        return f"blocks.{int(m[1])}.{local}" if local else None
    m = _VACE_BLOCK_RE.fullmatch(name)
    if m:
        return f"vace_blocks.{int(m[1])}.{m[2]}" if m[2] in BLOCK_MODULES or m[2] in _VACE_LOCAL else None
    if name == VACE_GLOBAL:
        return name
    return name if name in GLOBAL_MODULES else DIFFUSERS_GLOBAL.get(name)


def resolve_module(name: str) -> str | None:
    """Original Wan module path for a key's module part in any supported style, or None."""
    for prefix in _UNET_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            m = re.fullmatch(r"(vace_)?blocks_(\d+)_(.+)", rest)
            if m:
                local = _UNDERSCORED_BLOCK.get(m[3]) or (m[3] if m[1] and m[3] in _VACE_LOCAL else None)
                return f"{m[1] or ''}blocks.{int(m[2])}.{local}" if local else None
            return VACE_GLOBAL if rest == VACE_GLOBAL else _UNDERSCORED_GLOBAL.get(rest)
    for prefix in _DOTTED_PREFIXES:
        if name.startswith(prefix):
            found = _resolve_dotted(name[len(prefix):])
            if found:
                return found
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _resolve_part(name: str, part: str) -> str | None:
    """The Wan module a key's part patches: a ``diff_m`` patches its owner's modulation table."""
    if part != "diff_m":
        return resolve_module(name)
    for sep in _MODULATION_OWNER_SEPARATORS:
        module = resolve_module(f"{name}{sep}modulation")
        if module is not None:
            return module
    return None


def _alpha_value(t: torch.Tensor, key: str, source: str) -> float:
    if t.numel() != 1:
        raise PareFormatError(f"{source}: '{key}' should hold one number (the LoRA alpha), has shape {list(t.shape)}")
    return float(t.reshape(-1)[0].item())


def parse_lora(sd: Mapping[str, torch.Tensor], source: str = "lora") -> ParsedLora:
    """Group a LoRA state dict by original Wan module. Keys naming no Wan module go to ``unmatched``."""
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    for key, t in sd.items():
        split = _split_key(key)
        module = _resolve_part(*split) if split else None
        if module is None:
            unmatched.append(key)
            continue
        slot = parts.setdefault(module, {})
        part = "diff" if split[1] == "diff_m" else split[1]
        if part in slot:
            raise PareFormatError(
                f"{source}: '{key}' and '{slot[part][0]}' both give the {part} of Wan module '{module}'; "
                "the file mixes two key styles for one layer, so it is ambiguous which to apply"
            )
        slot[part] = (key, t)

    patches: dict[str, LoraPatch] = {}
    ignored: list[str] = []
    for module, slot in parts.items():
        if "dora_scale" in slot:
            raise PareFormatError(
                f"{source}: '{slot['dora_scale'][0]}' is a DoRA magnitude; DoRA LoRAs cannot be sliced exactly for "
                "a pruned model (the weight norm changes with the width) and are not supported"
            )
        if ("up" in slot) != ("down" in slot):
            have, lack = ("up", "down") if "up" in slot else ("down", "up")
            raise PareFormatError(f"{source}: '{slot[have][0]}' has no matching {lack} factor; the file is incomplete")
        if not any(p in slot for p in ("up", "diff", "diff_b")):
            ignored.extend(k for k, _ in slot.values())
            continue
        alpha = None
        if "alpha" in slot:
            if "up" in slot:
                alpha = _alpha_value(slot["alpha"][1], slot["alpha"][0], source)
            else:  # ComfyUI reads alpha only for low-rank pairs
                ignored.append(slot["alpha"][0])
        tensors = {p: t for p, (_, t) in slot.items()}
        patch = LoraPatch(module, tensors.get("up"), tensors.get("down"), alpha, tensors.get("diff"),
                          tensors.get("diff_b"), keys={p: k for p, (k, _) in slot.items()})
        if patch.up is not None and patch.diff is not None:
            logger.warning("%s: '%s' has both a low-rank pair and a .diff; ComfyUI applies only the .diff",
                           source, module)
        patches[module] = patch
    return ParsedLora(source, patches, unmatched, ignored)


def _looks_like_lora(key: str) -> bool:
    return _split_key(key) is not None or ".lora" in key or key.startswith(("lora_", "lycoris_"))


def not_a_lora_error(parsed: ParsedLora) -> PareFormatError:
    """The error for a file with no usable Wan LoRA keys, telling a model file from another model's LoRA."""
    keys = parsed.unmatched + parsed.ignored
    sample = ", ".join(f"'{k}'" for k in keys[:3]) or "no tensors"
    if not any(_looks_like_lora(k) for k in keys):
        return PareFormatError(
            f"{parsed.source}: not a Wan LoRA: not a LoRA file at all (none of its {len(keys)} tensors is a "
            f"lora_up/lora_down/lora_A/lora_B/.diff key; first keys: {sample}); is it a model checkpoint?"
        )
    return PareFormatError(
        f"{parsed.source}: not a Wan LoRA: none of its {len(keys)} LoRA keys names a Wan module "
        f"(first keys: {sample}); is it a LoRA for another model?"
    )


def _dim_evidence(module: str, p: LoraPatch) -> tuple[int, str, tuple[int, ...]] | None:
    """(model width this patch implies, the key that shows it, that tensor's shape), or None."""
    if module.startswith("vace_"):  # VACE in-channels and blocks: checked against the teacher's shapes instead
        return None
    local = split_block(module)[1]
    if local in _NO_DIM_AXIS:
        return None
    if local.endswith("modulation"):
        t, key, axis = p.diff, p.keys.get("diff"), -1
    elif local in _NORMS or local in _DIM_FROM_OUT:
        t, key = next(((getattr(p, a), p.keys[a]) for a in ("up", "diff", "diff_b") if getattr(p, a) is not None),
                      (None, None))
        axis = 0
    else:  # input width of a linear layer
        t, key = next(((getattr(p, a), p.keys[a]) for a in ("down", "diff") if getattr(p, a) is not None),
                      (None, None))
        axis = 1
    if t is None or t.dim() <= max(axis, 0):
        return None
    size = int(t.shape[axis]) if axis != 1 else int(prod(t.shape[1:]))
    return size, key, tuple(t.shape)


def teacher_shapes(dims: WanDims) -> dict[str, tuple[int, ...]]:
    return model_shapes(dims, [BlockWidth.full(dims)] * dims.num_layers)


def check_lora_base(parsed: ParsedLora, dims: WanDims, source: str | None = None) -> None:
    """Refuse a LoRA that was not trained for this teacher: other width, I2V keys on T2V, or wrong shapes."""
    source = source or parsed.source
    if not parsed.patches:
        raise not_a_lora_error(replace(parsed, source=source))
    evidence = [e for m, p in parsed.patches.items() if (e := _dim_evidence(m, p))]
    if evidence:
        dim = Counter(e[0] for e in evidence).most_common(1)[0][0]
        if dim != dims.dim:
            _, key, shape = next(e for e in evidence if e[0] == dim)
            raise PareFormatError(
                f"{source}: this LoRA was trained for {base_name(dim)} (e.g. '{key}' has shape {list(shape)}), "
                f"but the model is {base_name(dims.dim)} (dim {dims.dim}); use a LoRA made for the model's base"
            )
    i2v = [m for m in parsed.patches if m.startswith("img_emb.") or split_block(m)[1] in _I2V_ONLY]
    if i2v and dims.variant != "i2v":
        p = parsed.patches[i2v[0]]
        raise PareFormatError(
            f"{source}: this LoRA is for Wan2.1 I2V (it patches the image cross-attention, e.g. "
            f"'{next(iter(p.keys.values()))}'), but the model is T2V; use a T2V LoRA"
        )
    shapes = teacher_shapes(dims)
    for module, p in parsed.patches.items():
        block, _ = split_block(module)
        if block is not None and block >= dims.num_layers:
            raise PareFormatError(
                f"{source}: '{next(iter(p.keys.values()))}' patches block {block}, but the model has "
                f"{dims.num_layers} blocks (0-{dims.num_layers - 1}); the LoRA is for a deeper model"
            )
        _check_patch_shapes(p, shapes, source)


def _check_patch_shapes(p: LoraPatch, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    want = shapes.get(weight_key(p.module))
    if want is None:
        extra = " (a VACE LoRA on a model without VACE blocks?)" if p.module.startswith("vace_") else ""
        raise PareFormatError(f"{source}: '{next(iter(p.keys.values()))}' patches '{p.module}', which this model does "
                              f"not have{extra}")
    why = "a LoRA for the full (unpruned) teacher is expected"
    if p.up is not None:
        up, down = p.up, p.down
        if len(want) < 2 or p.module.endswith("modulation"):
            raise PareFormatError(
                f"{source}: '{p.keys['up']}' is a low-rank pair on '{weight_key(p.module)}' (shape {list(want)}), "
                "which is not a linear or conv weight; such weights can only be patched with a .diff"
            )
        if up.dim() < 2 or down.dim() < 2:
            bad = "up" if up.dim() < 2 else "down"
            raise PareFormatError(f"{source}: '{p.keys[bad]}' has shape {list(getattr(p, bad).shape)}; "
                                  "LoRA factors are at least 2-D")
        rank, n_in = down.shape[0], prod(down.shape[1:])
        if (up.shape[0], prod(up.shape[1:])) != (want[0], rank):
            raise shape_error(source, p.keys["up"], (want[0], rank), tuple(up.shape), why)
        if n_in != prod(want[1:]):
            raise shape_error(source, p.keys["down"], (rank, *want[1:]), tuple(down.shape), why)
    if p.diff is not None and tuple(p.diff.shape) != want:
        raise shape_error(source, p.keys["diff"], want, tuple(p.diff.shape), why)
    if p.diff_b is not None:
        bias = shapes.get(bias_key(p.module))
        if bias is None:
            raise PareFormatError(f"{source}: '{p.keys['diff_b']}' patches a bias, but Wan's '{p.module}' has none")
        if tuple(p.diff_b.shape) != bias:
            raise shape_error(source, p.keys["diff_b"], bias, tuple(p.diff_b.shape), why)


def made_for_student(parsed: ParsedLora, meta: PrunedWanMeta) -> bool:
    """True for a LoRA trained on this width-pruned student itself: every patch fits the student's own shapes and
    at least one of them a width the teacher does not have (so it is no teacher LoRA). It needs no slicing."""
    shapes = meta.expected_shapes()
    teacher = teacher_shapes(meta.dims)
    narrowed = False
    for p in parsed.patches.values():
        key = weight_key(p.module)
        if key not in shapes:
            return False
        try:
            _check_patch_shapes(p, shapes, parsed.source)
        except PareFormatError:
            return False
        narrowed = narrowed or shapes[key] != teacher.get(key)
    return narrowed


def _take(t: torch.Tensor | None, dim: int, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else torch.index_select(t, dim, idx).contiguous()


def slice_lora(parsed: ParsedLora, meta: PrunedWanMeta) -> ParsedLora:
    """The teacher LoRA cut to the student's kept heads and FFN neurons (exact: index selection only).

    On a depth-pruned student, teacher block j's patches go to the student block that is teacher block j
    (``blocks.i.`` with ``meta.kept_blocks[i] == j``); patches on removed blocks are dropped and logged once.
    """
    check_lora_base(parsed, meta.dims)
    hd, full = meta.dims.head_dim, BlockWidth.full(meta.dims)
    student_index = {t: i for i, t in enumerate(meta.teacher_blocks)}
    out: dict[str, LoraPatch] = {}
    dropped: list[str] = []
    narrowed = 0
    for module, p in parsed.patches.items():
        block, local = split_block(module)
        if block is not None:
            if block not in student_index:
                dropped.append(module)
                continue
            i = student_index[block]
            width = meta.blocks[i]
            if i != block:
                p = replace(p, module=f"blocks.{i}.{local}")
        else:
            width = full
        cut = _slice_patch(p, local, width, full, hd)
        narrowed += cut is not p
        out[cut.module] = cut
    if dropped:
        removed = sorted({split_block(m)[0] for m in dropped})
        logger.info("%s: %d patch(es) on teacher block(s) %s are not applied: the depth-pruned student removed "
                    "those blocks (it keeps teacher blocks %s)", parsed.source, len(dropped), removed,
                    list(meta.teacher_blocks))
    return ParsedLora(parsed.source, out, list(parsed.unmatched), list(parsed.ignored), dropped, narrowed)


def _slice_patch(p: LoraPatch, local: str, width: BlockWidth, full: BlockWidth, hd: int) -> LoraPatch:
    """One patch cut to one block's kept heads / FFN neurons (the same object when nothing narrows)."""
    if width.heads != full.heads and local.startswith("self_attn."):
        rows = torch.tensor([h * hd + c for h in width.heads for c in range(hd)], dtype=torch.long)
        if local in ("self_attn.q", "self_attn.k", "self_attn.v"):
            p = replace(p, up=_take(p.up, 0, rows), diff=_take(p.diff, 0, rows), diff_b=_take(p.diff_b, 0, rows))
        elif local in ("self_attn.norm_q", "self_attn.norm_k"):
            p = replace(p, diff=_take(p.diff, 0, rows))
        elif local == "self_attn.o":  # o's output (and bias) is the model width: only its input narrows
            p = replace(p, down=_take(p.down, 1, rows), diff=_take(p.diff, 1, rows))
    elif width.ffn != full.ffn and local in ("ffn.0", "ffn.2"):
        neurons = torch.tensor(width.ffn, dtype=torch.long)
        if local == "ffn.0":
            p = replace(p, up=_take(p.up, 0, neurons), diff=_take(p.diff, 0, neurons),
                        diff_b=_take(p.diff_b, 0, neurons))
        else:
            p = replace(p, down=_take(p.down, 1, neurons), diff=_take(p.diff, 1, neurons))
    return p


def to_standard_state_dict(parsed: ParsedLora, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """The ``diffusion_model.<module>.lora_down/lora_up/alpha/diff/diff_b`` layout stock ComfyUI loads."""
    sd: dict[str, torch.Tensor] = {}
    for module, p in parsed.patches.items():
        base = f"{prefix}{module}"
        if p.up is not None:
            sd[f"{base}.lora_up.weight"] = p.up
            sd[f"{base}.lora_down.weight"] = p.down
            if p.alpha is not None:
                sd[f"{base}.alpha"] = torch.tensor(p.alpha, dtype=torch.float32)  # 0-dim, as trainers write it
        if p.diff is not None:
            sd[f"{base}.diff"] = p.diff
        if p.diff_b is not None:
            sd[f"{base}.diff_b"] = p.diff_b
    return sd


def load_lora_file(path: str | os.PathLike) -> ParsedLora:
    """Read a LoRA safetensors file (pickle and truncated files are refused) and parse it."""
    tensors, _ = load_tensors(path)
    parsed = parse_lora(tensors, str(path))
    if not parsed.patches:
        raise not_a_lora_error(parsed)
    logger.info("%s: %d Wan module patch(es) from %d tensor(s)", path, len(parsed.patches), len(tensors))
    return parsed


def merged_deltas(
    parsed: ParsedLora, strength: float = 1.0, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """fp32 delta per state-dict key, as ComfyUI 0.3.75 adds it to the fp32 copy of each weight.

    ``shapes`` (e.g. ``PrunedWanMeta.expected_shapes()``) reshapes low-rank products whose factors are flat
    (a conv weight patched by [rank, in * kernel] factors); without it the product takes the factors' shape.
    """
    out: dict[str, torch.Tensor] = {}
    for module, p in parsed.patches.items():
        wk = weight_key(module)
        if p.diff is not None:  # ComfyUI's load_lora lets a .diff replace a low-rank pair on the same layer
            out[wk] = strength * p.diff.to(torch.float32)
        elif p.up is not None:
            scale = p.alpha / p.down.shape[0] if p.alpha is not None else 1.0
            product = torch.mm(p.up.flatten(1).to(torch.float32), p.down.flatten(1).to(torch.float32))
            shape = shapes[wk] if shapes is not None else (p.up.shape[0], *p.down.shape[1:])
            out[wk] = ((strength * scale) * product).reshape(shape)
        if p.diff_b is not None:
            out[bias_key(module)] = strength * p.diff_b.to(torch.float32)
    return out
