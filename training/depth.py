"""Static depth pruning (VDMini): which whole teacher blocks a student drops, from calibration's block contributions.

``block_contribution`` [S, L] (calibration: ||B_i(x) - x|| / ||x|| per timestep and block) is averaged over the
timesteps; a block that changes its input little is the cheapest to remove. Two orders:

* ``shallow`` (VDMini): candidates are the shallow blocks only (the first ``shallow_fraction`` of the depth), since
  shallow blocks carry per-frame content that the remaining blocks and the content loss recover, while deep blocks
  carry motion. Among them the lowest contributions go first.
* ``contribution``: the lowest contributions anywhere.

The first and last blocks are kept unless ``pin_ends`` is off. How many blocks go: ``remove`` blocks, or as many as
it takes (in the chosen order) for the student's per-step block compute to reach ``compute_target`` of the
teacher's, counted with ``comfyui_pare.compute`` on the (possibly already width-pruned) widths. The result is the
``kept_blocks`` of a ``comfyui_pare.surgery.PrunePlan``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from comfyui_pare.compute import block_macs, tokens_for
from comfyui_pare.errors import PareFormatError
from comfyui_pare.wan import TEXT_TOKENS, BlockWidth, WanDims

logger = logging.getLogger(__name__)

ORDERS = ("shallow", "contribution")
DEFAULT_TOKENS = tokens_for(81, 480, 832)  # compute is counted at 480p, 81 frames unless told otherwise


@dataclass(frozen=True)
class DepthOptions:
    remove: int | None = None  # number of teacher blocks to drop
    compute_target: float | None = None  # or: student block compute / teacher block compute to reach
    order: Literal["shallow", "contribution"] = "shallow"
    shallow_fraction: float = 0.5  # 'shallow': candidates are the first ceil(fraction x L) blocks
    pin_ends: bool = True  # never drop the first and the last block
    tokens: int = DEFAULT_TOKENS  # video tokens and text tokens the compute fractions are counted at
    text_tokens: int = TEXT_TOKENS

    def validate(self, num_layers: int) -> None:
        if (self.remove is None) == (self.compute_target is None):
            raise PareFormatError("depth pruning needs exactly one of --remove-blocks and --depth-target")
        if self.remove is not None and not 0 < self.remove < num_layers:
            raise PareFormatError(f"--remove-blocks must be in [1, {num_layers - 1}] for a {num_layers}-block "
                                  f"teacher, got {self.remove}")
        if self.compute_target is not None and not 0.0 < self.compute_target < 1.0:
            raise PareFormatError(f"--depth-target is a compute fraction in (0, 1), got {self.compute_target}")
        if self.order not in ORDERS:
            raise PareFormatError(f"--depth-order must be one of {ORDERS}, got {self.order!r}")
        if not 0.0 < self.shallow_fraction <= 1.0:
            raise PareFormatError(f"--shallow-fraction must be in (0, 1], got {self.shallow_fraction}")


def removal_order(contribution: torch.Tensor, opts: DepthOptions) -> list[int]:
    """Teacher blocks in the order they are dropped (first = dropped first)."""
    if contribution.dim() != 2:
        raise PareFormatError(f"block_contribution must be [timesteps, blocks], got {list(contribution.shape)}")
    layers = contribution.shape[1]
    mean = contribution.double().mean(0)
    candidates = list(range(layers))
    if opts.pin_ends:
        candidates = [i for i in candidates if i not in (0, layers - 1)]
    if opts.order == "shallow":
        limit = math.ceil(opts.shallow_fraction * layers)
        candidates = [i for i in candidates if i < limit]
    return sorted(candidates, key=lambda i: (float(mean[i]), i))


def choose_kept_blocks(contribution: torch.Tensor, opts: DepthOptions, dims: WanDims,
                       widths: Sequence[BlockWidth] | None = None) -> tuple[int, ...]:
    """The teacher blocks the student keeps (sorted). ``widths``: per teacher block, for compute targets."""
    layers = dims.num_layers
    if contribution.shape[-1] != layers:
        raise PareFormatError(f"block_contribution has {contribution.shape[-1]} blocks, the teacher has {layers}")
    opts.validate(layers)
    order = removal_order(contribution, opts)
    if opts.remove is not None:
        if opts.remove > len(order):
            raise PareFormatError(
                f"--remove-blocks {opts.remove}: only {len(order)} blocks are candidates ({opts.order} order"
                f"{', first and last pinned' if opts.pin_ends else ''}); raise --shallow-fraction or use "
                "--depth-order contribution")
        removed = order[:opts.remove]
    else:
        widths = list(widths) if widths is not None else [BlockWidth.full(dims)] * layers
        cost = [block_macs(dims, w, opts.tokens, opts.text_tokens).total for w in widths]
        teacher = layers * block_macs(dims, BlockWidth.full(dims), opts.tokens, opts.text_tokens).total
        kept_cost, removed = sum(cost), []
        for i in order:
            if kept_cost <= opts.compute_target * teacher:
                break
            removed.append(i)
            kept_cost -= cost[i]
        if kept_cost > opts.compute_target * teacher:
            raise PareFormatError(
                f"--depth-target {opts.compute_target}: dropping every candidate block ({len(order)}, {opts.order} "
                f"order) leaves {kept_cost / teacher:.3f} of the teacher's compute; raise --shallow-fraction, use "
                "--depth-order contribution, or prune widths too")
    kept = tuple(i for i in range(layers) if i not in set(removed))
    logger.info("depth: removing teacher blocks %s (%s order; mean contributions %s), keeping %d of %d",
                sorted(removed), opts.order,
                [round(float(contribution[:, i].double().mean()), 4) for i in sorted(removed)], len(kept), layers)
    return kept


def add_depth_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("depth (static block removal, VDMini)")
    g.add_argument("--depth", choices=("none", "static"), default="none",
                   help="'static': also remove whole teacher blocks (a smaller file, a fixed speed-up, no router)")
    g.add_argument("--remove-blocks", type=int, default=None, help="how many teacher blocks to remove")
    g.add_argument("--depth-target", type=float, default=None,
                   help="or: remove blocks until the per-step block compute is this fraction of the teacher's "
                        "(after any width pruning), e.g. 0.6")
    g.add_argument("--depth-order", choices=ORDERS, default="shallow",
                   help="'shallow' (VDMini): the lowest-contribution blocks among the shallow ones; 'contribution': "
                        "the lowest-contribution blocks anywhere")
    g.add_argument("--shallow-fraction", type=float, default=0.5,
                   help="'shallow' order: candidates are the first ceil(fraction x blocks) blocks")
    g.add_argument("--no-pin-ends", action="store_true", help="allow removing the first and the last block")
    g.add_argument("--depth-tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"video tokens the --depth-target compute is counted at (default {DEFAULT_TOKENS}: 81 "
                        "frames at 832x480)")
    g.add_argument("--depth-text-tokens", type=int, default=TEXT_TOKENS,
                   help=f"text tokens the --depth-target compute is counted at (default {TEXT_TOKENS})")


def depth_options(args: argparse.Namespace) -> DepthOptions | None:
    """The depth options of parsed arguments, or None without ``--depth static``."""
    if args.depth == "none":
        if args.remove_blocks is not None or args.depth_target is not None:
            raise PareFormatError("--remove-blocks / --depth-target need --depth static")
        return None
    return DepthOptions(args.remove_blocks, args.depth_target, args.depth_order, args.shallow_fraction,
                        not args.no_pin_ends, args.depth_tokens, args.depth_text_tokens)
