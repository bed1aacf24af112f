"""``python -m training calibrate``: run the teacher over calibration samples and record what pruning needs.

For every sample and every calibration timestep (sigmas of Wan's shifted schedule) the teacher runs block by
block on the noised sample. Forward hooks on each block's self-attention read its input and the attention
output before ``o``, so the block itself runs unchanged. Per head: the intra-slice ratio (``attention_stats``,
on ``query_rows`` random rows) and the raw importance, the mean norm over those rows of the head's share of the
residual update, ``gate1 * o[:, head](out_head)``. Per FFN neuron: ||row j of ffn.0|| x ||column j of ffn.2||.
Per block and timestep: ||B(x) - x|| / ||x||.

Stats file (safetensors): ``head_ratio`` [L, H], ``head_type`` [L, H] int8, ``head_importance`` [L, H] (raw),
``head_importance_adjusted`` [L, H] (``normalize``), ``ffn_importance.<i>`` [F_i], ``block_contribution`` [S, L],
``timesteps`` [S] (sigma x 1000), and the JSON summary under the header key ``pare_stats``. Beside it
``<name>_head_types.png`` and ``<name>_block_contribution.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from einops import rearrange, reduce
from tqdm.auto import tqdm

from comfyui_pare.calibration import read_folder
from comfyui_pare.errors import PareFormatError
from comfyui_pare.safetensors_io import load_tensors, save_atomic

from .attention_stats import frame_of_tokens, intra_slice_ratio, sample_rows
from .data import PreparedSample, noised, prepare_sample, with_condition
from .model import WanTransformer, apply_rope
from .plots import category_grid_png, heatmap_png
from .sampling import flow_sigmas
from .schedule_suggest import write_suggestions
from .scores import TYPE_NAMES, adjust_importance, classify
from .teacher import load_model

logger = logging.getLogger(__name__)

HELP = "run the teacher on calibration samples: head types and scores, FFN scores, block contributions"
STATS_KEY = "pare_stats"
STATS_VERSION = 1


@dataclass
class CalibrateOptions:
    sigmas: tuple[float, ...] = (0.95, 0.8, 0.6, 0.4, 0.2)
    query_rows: int = 256
    key_chunk: int = 4096
    spatial_threshold: float = 0.7
    temporal_threshold: float = 0.3
    seed: int = 0


@dataclass
class CalibrationStats:
    head_ratio: torch.Tensor  # [L, H]
    head_importance: torch.Tensor  # [L, H] raw
    ffn_importance: list[torch.Tensor]  # [F_i] per block
    block_contribution: torch.Tensor  # [S, L]
    timesteps: torch.Tensor  # [S]
    summary: dict

    def head_type(self) -> torch.Tensor:
        o = self.summary["options"]
        return classify(self.head_ratio, o["spatial_threshold"], o["temporal_threshold"])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"head_ratio": self.head_ratio.float(), "head_type": self.head_type(),
               "head_importance": self.head_importance.float(),
               "head_importance_adjusted": adjust_importance(self.head_importance, self.head_type()).float(),
               "block_contribution": self.block_contribution.float(), "timesteps": self.timesteps.float()}
        out.update({f"ffn_importance.{i}": f.float() for i, f in enumerate(self.ffn_importance)})
        return out

    def save(self, path: str | os.PathLike) -> None:
        save_atomic(path, self.tensors(), {STATS_KEY: json.dumps(self.summary), "format": "pt"})
        stem = Path(path).with_suffix("")
        category_grid_png(f"{stem}_head_types.png", self.head_type().numpy(), TYPE_NAMES,
                          "head type per block (intra-slice attention ratio)", "blocks", "heads")
        heatmap_png(f"{stem}_block_contribution.png", self.block_contribution.numpy(),
                    "block contribution ||B(x)-x||/||x||", "timesteps (noisiest first)", "blocks")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStats":
        tensors, meta = load_tensors(path)
        if STATS_KEY not in meta:
            raise PareFormatError(f"{path}: not a calibration stats file (no '{STATS_KEY}' metadata); "
                                  "make one with `python -m training calibrate`")
        summary = json.loads(meta[STATS_KEY])
        for key in ("head_ratio", "head_importance", "block_contribution", "timesteps"):
            if key not in tensors:
                raise PareFormatError(f"{path}: stats tensor '{key}' is missing")
        layers = tensors["head_ratio"].shape[0]
        missing = [i for i in range(layers) if f"ffn_importance.{i}" not in tensors]
        if missing:
            raise PareFormatError(f"{path}: stats tensor 'ffn_importance.{missing[0]}' is missing")
        return cls(tensors["head_ratio"], tensors["head_importance"],
                   [tensors[f"ffn_importance.{i}"] for i in range(layers)], tensors["block_contribution"],
                   tensors["timesteps"], summary)


def ffn_norm_product(model: WanTransformer) -> list[torch.Tensor]:
    """Per block, ||row j of ffn.0|| x ||column j of ffn.2|| for every neuron j (float32, CPU)."""
    return [(b.ffn[0].weight.float().norm(dim=1) * b.ffn[2].weight.float().norm(dim=0)).cpu() for b in model.blocks]


class _BlockProbe:
    """Forward pre-hooks that keep a block's self-attention input and the input of its ``o`` projection."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.seen: dict[str, object] = {}
        self.handles = [
            block.self_attn.register_forward_pre_hook(lambda _m, args: self.seen.__setitem__("attn_in", args)),
            block.self_attn.o.register_forward_pre_hook(lambda _m, args: self.seen.__setitem__("o_in", args[0])),
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def head_stats(block: torch.nn.Module, attn_in: tuple, o_in: torch.Tensor, gate: torch.Tensor,
               frames: torch.Tensor, rows: torch.Tensor, key_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean intra-slice ratio [H], mean head contribution norm [H]) over ``rows`` for one sample (batch 1)."""
    sa = block.self_attn
    xm, (cos, sin) = attn_in
    heads, d = sa.num_heads, sa.head_dim
    rows_d = rows.to(xm.device)
    q = sa.norm_q(sa.q(xm[:, rows_d])).view(1, len(rows), heads, d)
    q = apply_rope(q, (cos[rows_d], sin[rows_d]))
    k = apply_rope(sa.norm_k(sa.k(xm)).view(1, xm.shape[1], heads, d), (cos, sin))
    q, k = (rearrange(t[0], "l h d -> h l d") for t in (q, k))
    ratio = intra_slice_ratio(q, k, frames, rows_d, key_chunk).mean(dim=1)
    per_head = rearrange(o_in[0, rows_d].float(), "r (h d) -> r h d", h=heads)
    w_o = rearrange(sa.o.weight.float(), "e (h d) -> e h d", h=heads)
    contrib = torch.einsum("rhd,ehd->rhe", per_head, w_o) * gate.float().reshape(1, 1, -1)
    return ratio.cpu(), reduce(contrib.norm(dim=-1), "r h -> h", "mean").cpu()


@torch.no_grad()
def calibrate(model: WanTransformer, samples: list[PreparedSample], opts: CalibrateOptions) -> CalibrationStats:
    """Run the teacher over every (sample, sigma) and average the statistics."""
    if model.meta.is_pruned:
        raise PareFormatError("calibrate runs on a full-width teacher; this model is already pruned")
    dims = model.dims
    layers, heads, steps = dims.num_layers, dims.num_heads, len(opts.sigmas)
    device = next(model.parameters()).device
    dtype = model.text_embedding[0].weight.dtype
    gen = torch.Generator().manual_seed(opts.seed)
    ratio_sum = torch.zeros(layers, heads, dtype=torch.float64)
    imp_sum = torch.zeros(layers, heads, dtype=torch.float64)
    contrib_sum = torch.zeros(steps, layers, dtype=torch.float64)
    probes = [_BlockProbe(b) for b in model.blocks]
    bar = tqdm(total=len(samples) * steps, desc="calibrate", unit="pass")
    try:
        for sample in samples:
            for s, sigma in enumerate(opts.sigmas):
                sig = torch.tensor([sigma])
                x = with_condition(noised(sample.x0[None], sample.noise[None], sig), sample.x0[None], dims)
                clip = None if sample.clip_fea is None else sample.clip_fea[None].to(device, dtype)
                p = model.prepare(x.to(device, dtype), (sig * 1000).to(device), sample.context[None].to(device, dtype),
                                  clip)
                frames = frame_of_tokens(p.grid, device)
                h = p.tokens
                for i, block in enumerate(model.blocks):
                    out = model.run_block(i, h, p)
                    seen = probes[i].seen
                    gate = (block.modulation.to(h.dtype) + p.e)[0, 2]
                    rows = sample_rows(h.shape[1], opts.query_rows, gen)
                    r, imp = head_stats(block, seen["attn_in"], seen["o_in"], gate, frames, rows, opts.key_chunk)
                    ratio_sum[i] += r.double()
                    imp_sum[i] += imp.double()
                    contrib_sum[s, i] += float((out.float() - h.float()).norm() / h.float().norm().clamp_min(1e-12))
                    seen.clear()
                    h = out
                bar.update(1)
    finally:
        bar.close()
        for probe in probes:
            probe.close()
    n = len(samples)
    passes = n * steps
    summary = {
        "format_version": STATS_VERSION, "teacher": model.meta.to_json()["teacher"], "variant": dims.variant,
        "samples": n, "sample_files": [os.path.basename(s.path) for s in samples],
        "sigmas": list(opts.sigmas), "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in asdict(opts).items()},
    }
    stats = CalibrationStats((ratio_sum / passes).float(), (imp_sum / passes).float(), ffn_norm_product(model),
                             (contrib_sum / n).float(), torch.tensor(opts.sigmas) * 1000, summary)
    types = stats.head_type()
    summary["type_counts_per_block"] = [[int((types[i] == t).sum()) for t in range(3)] for i in range(layers)]
    summary["type_counts"] = {name: int((types == t).sum()) for t, name in enumerate(TYPE_NAMES)}
    return stats


def default_sigmas(count: int, shift: float) -> tuple[float, ...]:
    """``count`` sigmas of Wan's shifted schedule, evenly spread over the sampling steps (noisiest first)."""
    sig = flow_sigmas(count, shift)[:-1]
    return tuple(round(float(s), 6) for s in sig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="Wan2.1 teacher checkpoint (any supported layout)")
    p.add_argument("--samples", required=True, help="folder of calibration samples (*.safetensors)")
    p.add_argument("--out", required=True, help="stats file to write (.safetensors); PNGs are written beside it")
    p.add_argument("--timesteps", type=int, default=5, help="calibration timesteps: this many sigmas of the "
                   "shifted schedule (default 5)")
    p.add_argument("--sigmas", type=str, default=None, help="explicit comma-separated sigmas instead of --timesteps")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift of the schedule (Wan: 5.0; 3.0 for 480p I2V)")
    p.add_argument("--query-rows", type=int, default=256, help="query rows sampled per head for the ratio")
    p.add_argument("--key-chunk", type=int, default=4096, help="keys per chunk (bounds memory)")
    p.add_argument("--spatial-threshold", type=float, default=0.7, help="ratio at or above which a head is spatial")
    p.add_argument("--temporal-threshold", type=float, default=0.3, help="ratio at or below which a head is temporal")
    p.add_argument("--generate-steps", type=int, default=0, help="for samples without a latent: make one with "
                   "this many teacher Euler steps (0: such samples are an error)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query-row sampling")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="teacher compute dtype (bfloat16 for 14B on one GPU)")


def run(args: argparse.Namespace) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sigmas = (tuple(float(s) for s in args.sigmas.split(",")) if args.sigmas
              else default_sigmas(args.timesteps, args.shift))
    if not sigmas or not all(0.0 < s <= 1.0 for s in sigmas):
        raise PareFormatError(f"--sigmas must be in (0, 1], got {list(sigmas)}")
    opts = CalibrateOptions(sigmas, args.query_rows, args.key_chunk, args.spatial_threshold, args.temporal_threshold,
                            args.seed)
    classify(torch.zeros(1), opts.spatial_threshold, opts.temporal_threshold)  # validate thresholds up front
    raw = read_folder(args.samples)
    model = load_model(args.teacher, dtype=getattr(torch, args.dtype), device=device)
    samples = [prepare_sample(s, model.dims, model, args.generate_steps, args.shift) for s in raw]
    stats = calibrate(model, samples, opts)
    stats.save(args.out)
    logger.info("wrote %s: %s heads over %d samples x %d timesteps", args.out, stats.summary["type_counts"],
                len(samples), len(sigmas))
    print_suggestions(args.out, stats, args.shift)
    return 0


def print_suggestions(stats_path: str, stats: CalibrationStats, shift: float) -> None:
    """The training-free start: static schedules the block contributions suggest, printed and written beside the
    stats (``training.schedule_suggest``)."""

    try:
        path, out = write_suggestions(stats_path, stats.block_contribution, stats.summary["sigmas"], shift)
    except ValueError as e:  # e.g. repeated --sigmas: the stats are written; only the suggestions are skipped
        logger.warning("no static schedule suggestions: %s", e)
        return
    print(f"PARE Static Block Schedule suggestions (shift {shift:g}; first and last block kept; {path}):")
    for s in out:
        print(f"  budget {s.budget:.2f} (nominal {s.compute:.3f}): {s.schedule or '(nothing to skip)'}")
