"""Fit the toy router to oracle labels (``scripts/router_labels_toy.py``) and write it (uncalibrated: the budget
calibration is ``scripts/budget_curve.py --calibrate-router``'s).

    python -m scripts.router_fit_toy --labels /tmp/router_labels --out /tmp/router.safetensors \
        [--static-path docs/toy_budget_curve.json] [--dev]

The prior is the greedy static search's skip order (``static_search_path`` of the budget-curve JSON, searched on
other prompts), one knot per step of the toy schedule. ``--dev`` then samples validation prompts (seen split: not
held out, not labelled) at budgets 0.4-0.6 and compares the router with the searched static schedules.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from comfyui_pare.router import BlockRouter, RouterSpec, save_router
from comfyui_pare.safetensors_io import load_tensors, read_header

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("router_fit")
WEIGHTS = REPO / "training" / "toyworld" / "weights"
PIN = (1, 1)


def load_labels(folder: Path, part: str):

    tables, ts, cond, groups, pooled, meta = [], [], [], [], [], []
    for k, f in enumerate(sorted(folder.glob(f"{part}_*.safetensors"))):
        t, _ = load_tensors(f)
        md = read_header(str(f))[1]
        s = t["sigmas"].shape[0]
        tables.append(t["tables"])
        ts.append(t["sigmas"] * 1000)
        cond.append(t["context"][None].expand(s, -1, -1))
        groups.append(torch.full((s,), k))
        pooled.append(torch.cat([t["token_mean"], t["token_std"]], dim=1))  # block 0's input, per step
        meta.append(md)
    return tables, ts, cond, groups, pooled, meta


def label_set(folder: Path, part: str, uncond: torch.Tensor, keep: slice = slice(None), token_input: bool = False):
    from training.router_fit import LabelSet, step_weight

    tables, ts, cond, groups, pooled, meta = (x[keep] for x in load_labels(folder, part))
    t = torch.cat(ts)
    tab = torch.cat(tables)
    scale = tab.flatten(1).amax(1).mean()  # one global scale: keeps the steps' relative weights
    # The patch-embedded latent does not depend on the text: the cond and the uncond row read the same statistics.
    tokens = torch.cat(pooled) if token_input else None
    return LabelSet(tables=tab / scale, timesteps=t, cond=torch.cat(cond), uncond=uncond,
                    weights=step_weight(t / 1000), groups=torch.cat(groups), pooled_cond=tokens,
                    pooled_uncond=tokens), meta


def static_rank(path: list[dict], n: int, sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """[steps, N]: the greedy search step at which each (step, block) cell was first skipped (inf: pinned)."""
    from comfyui_pare.schedule import parse_schedule
    from training.schedule_suggest import step_masks

    rank = torch.full((len(sigmas), n), 1e9)
    for k, state in enumerate(path):
        run = step_masks(parse_schedule(state["schedule"], n), n, sigmas.tolist(), shift)
        rank = torch.where(~run & (rank > 1e8), torch.full_like(rank, float(k)), rank)
    rank[rank > 1e8] = len(path)  # never skipped by the search: after every searched cell
    rank[:, :PIN[0]] = float("inf")
    rank[:, n - PIN[1]:] = float("inf")
    return rank


def prior_router(meta, static_path: Path, hidden: int, text_input: bool, token_input: bool) -> BlockRouter:
    """A fresh format-2 router for the toy student whose prior is the greedy static search's skip order (one knot per
    step of the toy schedule): before fitting it *is* the searched static schedules."""
    from training.router_fit import prior_from_order
    from training.sampling import flow_sigmas
    from training.toyworld import evaluate
    from training.toyworld.teacher import SHIFT

    sigmas = flow_sigmas(evaluate.STEPS, SHIFT)[:-1].float()
    rank = static_rank(json.loads(static_path.read_text())["static_search_path"], meta.num_blocks, sigmas, SHIFT)
    spec = RouterSpec(num_blocks=meta.num_blocks, dim=meta.dims.dim, freq_dim=8,
                      text_dim=meta.dims.text_dim if text_input else 0, hidden=hidden,
                      model_fingerprint=meta.fingerprint(), prior_knots=len(sigmas), layer_norm=True,
                      token_input=token_input, time_code="fourier")
    router = BlockRouter(spec, init_bias=0.0)
    router.set_prior(sigmas * 1000, prior_from_order(rank))
    return router


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--static-path", type=Path, default=REPO / "docs" / "toy_budget_curve.json")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-learn-prior", action="store_true")
    p.add_argument("--clip-budget-weight", type=float, default=100.0,
                   help="per-prompt spend penalty (content moves cells more than compute)")
    p.add_argument("--token-input", action="store_true",
                   help="also read the pooled latent entering block 0 (both CFG rows; off: step and text only)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from comfyui_pare.toy_text import ToyTextEncoder
    from training.model import WanTransformer
    from training.routed import block_costs, pin_mask
    from training.router_fit import FitConfig, fit_router

    t0 = time.process_time()
    student = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student.safetensors").eval()
    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    meta = student.meta
    n = meta.num_blocks
    with torch.no_grad():
        uncond = text([""])[0]
    if any(args.labels.glob("val_*.safetensors")):
        train, _ = label_set(args.labels, "train", uncond, token_input=args.token_input)
        val, _ = label_set(args.labels, "val", uncond, token_input=args.token_input)
    else:  # labelling still running: the last 3 training clips validate
        train, _ = label_set(args.labels, "train", uncond, slice(None, -3), args.token_input)
        val, _ = label_set(args.labels, "train", uncond, slice(-3, None), args.token_input)
    log.info("labels: %d train rows, %d val rows", train.timesteps.shape[0], val.timesteps.shape[0])
    router = prior_router(meta, args.static_path, args.hidden, text_input=True, token_input=args.token_input)
    costs = torch.tensor(block_costs(meta, 80, 16))
    pinned = pin_mask(n, *PIN)
    cfg = FitConfig(steps=args.steps, learning_rate=args.lr, learn_prior=not args.no_learn_prior,
                    clip_budget_weight=args.clip_budget_weight)
    report = fit_router(router, train, val, costs, pinned, cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_router(args.out, router)
    report["cpu_s"] = time.process_time() - t0
    args.out.with_suffix(".fit.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %s (fit cpu %.0f s)", args.out, report["cpu_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
