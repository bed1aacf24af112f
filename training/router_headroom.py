"""How much a content-adaptive router could gain at all, read off oracle labels (``training.router_oracle``).

Before fitting a router to read the content, this measures the ceiling of content adaptation on held-out clips:
for a budget, each policy picks one (cond mask, uncond mask) pair per step, and the policies differ only in what
they may know about the clip:

* ``per_phase``: nothing, and one pair per phase (``phases`` equal runs of steps): a per-phase static schedule;
* ``per_step``: nothing (one pair per step for every clip: a per-step static schedule, the best timestep-only
  router);
* ``per_class``: the clip's class (e.g. one- or two-object prompt) for both CFG rows;
* ``per_class_cond_only``: the class for the cond row only; the uncond row keeps one mask per step. This is all a
  router that reads the *text* can do, since every uncond row reads the same empty prompt;
* ``per_clip``: the clip itself (the oracle, chosen on the clip it is scored on: an upper bound).

Policies are chosen on one half of the clips and scored on the other (``splits`` random halvings, both ways), at
one Lagrange multiplier per budget: minimise the clip-normalised error plus ``lam`` x spend, so a policy may spend
more on some clips than on others as long as the mean spend matches. Scores are interpolated to equal mean spend.
A clip's error is the sum over its steps of the table entry, divided by its error with every block running, and
policies are compared by the geometric mean over clips.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

POLICIES = ("per_phase", "per_step", "per_class", "per_class_cond_only", "per_clip")


@dataclass
class HeadroomConfig:
    budgets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    splits: int = 5
    seed: int = 0
    multipliers: int = 80  # Lagrange multipliers swept (log-spaced)
    phases: int = 4  # the per-phase static policy's phases (equal runs of steps)


def pair_costs(costs: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """[M, M]: the spend (share of the block compute, mean of the two CFG rows) of every (cond, uncond) mask pair,
    masks over the unpinned blocks (bit j of mask m: the j-th unpinned block runs)."""
    c = costs.double() / costs.double().sum()
    unpinned = torch.nonzero(~pinned).flatten()
    u = len(unpinned)
    bits = ((torch.arange(2 ** u)[:, None] >> torch.arange(u)[None]) & 1).double()
    row = float(c[pinned].sum()) + bits @ c[unpinned]
    return 0.5 * (row[:, None] + row[None, :])


def _best_pairs(table: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    """Per step, the flat index of the pair minimising error + lam x spend (``table`` [S, M, M])."""
    return (table + lam * cost[None]).flatten(1).argmin(1)


def _best_pairs_per_phase(table: torch.Tensor, cost: torch.Tensor, lam: float, phases: int) -> torch.Tensor:
    """One pair per phase (``phases`` equal runs of the steps), repeated over its steps."""
    out = []
    for run in torch.arange(table.shape[0]).tensor_split(phases):
        pick = int((table[run].sum(0) + len(run) * lam * cost).flatten().argmin())
        out += [pick] * len(run)
    return torch.tensor(out)


def _best_pairs_cond_only(tables: list[torch.Tensor], cost: torch.Tensor, lam: float) -> list[torch.Tensor]:
    """Per class, per step the flat pair index when the uncond mask is shared by every class."""
    out = [[] for _ in tables]
    m = cost.shape[0]
    for s in range(tables[0].shape[0]):
        per_class = [t[s] + lam * cost for t in tables]  # [Mc, Mu]
        total = sum(p.min(0).values for p in per_class)  # for each uncond mask: every class's best cond mask
        mu = int(total.argmin())
        for k, p in enumerate(per_class):
            out[k].append(int(p[:, mu].argmin()) * m + mu)
    return [torch.tensor(o) for o in out]


def content_headroom(tables: torch.Tensor, classes: torch.Tensor, costs: torch.Tensor, pinned: torch.Tensor,
                     cfg: HeadroomConfig | None = None) -> dict:
    """Held-out error of each policy (``POLICIES``) at each budget.

    ``tables`` [C, S, M, M]: per clip and step, the error of every (cond mask, uncond mask) pair; mask M-1 runs
    every unpinned block. ``classes`` [C]: an integer class per clip. Returns ``{"budgets": [...], policy: [geometric
    mean error at each budget], policy + "_vs_per_step": [relative change]}``.
    """
    cfg = cfg or HeadroomConfig()
    c, s, m, _ = tables.shape
    if classes.shape != (c,):
        raise ValueError(f"classes must be [{c}] (one per clip), got {list(classes.shape)}")
    full = tables[:, :, m - 1, m - 1].double().sum(1)
    if bool((full <= 0).any()):
        raise ValueError("a clip's error with every block running is 0: nothing to normalise by")
    norm = tables.double() / full[:, None, None, None]
    cost = pair_costs(costs, pinned)
    flat_cost = cost.flatten()
    labels = sorted(set(classes.tolist()))
    rng = np.random.default_rng(cfg.seed)
    halves = []
    for _ in range(cfg.splits):
        perm = rng.permutation(c)
        halves += [(perm[: c // 2], perm[c // 2:]), (perm[c // 2:], perm[: c // 2])]
    steps = torch.arange(s)

    def score(test: np.ndarray, picks: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        err = torch.stack([norm[k].flatten(1)[steps, picks[k]].sum() for k in test])
        spend = torch.stack([flat_cost[picks[k]].mean() for k in test])
        return err, spend

    curves = {p: [] for p in POLICIES}
    for lam in np.exp(np.linspace(np.log(1e-4), np.log(50.0), cfg.multipliers)):
        acc = {p: ([], []) for p in POLICIES}
        for train, test in halves:
            def mean_of(members):
                return norm[list(members)].mean(0)
            shared = _best_pairs(mean_of(train), cost, lam)
            by_class, members = {}, {}
            for lab in labels:
                members[lab] = [k for k in train if int(classes[k]) == lab] or list(train)
                by_class[lab] = _best_pairs(mean_of(members[lab]), cost, lam)
            cond_only = dict(zip(labels, _best_pairs_cond_only([mean_of(members[lab]) for lab in labels], cost, lam)))
            picks = {
                "per_phase": {k: _best_pairs_per_phase(mean_of(train), cost, lam, cfg.phases) for k in test},
                "per_step": {k: shared for k in test},
                "per_class": {k: by_class[int(classes[k])] for k in test},
                "per_class_cond_only": {k: cond_only[int(classes[k])] for k in test},
                "per_clip": {k: _best_pairs(norm[k], cost, lam) for k in test},
            }
            for p in POLICIES:
                e, sp = score(test, picks[p])
                acc[p][0].append(e)
                acc[p][1].append(sp)
        for p in POLICIES:
            e, sp = torch.cat(acc[p][0]), torch.cat(acc[p][1])
            curves[p].append((float(sp.mean()), float(e.clamp_min(1e-300).log().mean().exp())))
    out: dict = {"budgets": list(cfg.budgets)}
    for p in POLICIES:
        spend = np.array([x[0] for x in curves[p]])
        err = np.array([x[1] for x in curves[p]])
        order = np.argsort(spend)
        out[p] = [float(np.interp(b, spend[order], err[order])) for b in cfg.budgets]
    for p in POLICIES:
        if p == "per_step":
            continue
        out[p + "_vs_per_step"] = [a / b - 1.0 for a, b in zip(out[p], out["per_step"])]
    return out


def format_table(result: dict) -> str:
    lines = ["| budget | per-phase static | per-step static | per class, both rows | per class, cond row only | "
             "per clip (oracle) |", "|---|---|---|---|---|---|"]
    for i, b in enumerate(result["budgets"]):
        cells = [f"{result[p][i]:.3f}" if p == "per_step" else
                 f"{result[p][i]:.3f} ({100 * result[p + '_vs_per_step'][i]:+.1f}%)" for p in POLICIES]
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_label_folder(folder: Path, class_key: str = "objects",
                      parts: tuple[str, ...] = ("train", "val")) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables [C, S, M, M] and classes [C] from the label files of ``scripts.router_labels_toy`` (``<part>_*``)."""
    from comfyui_pare.safetensors_io import load_tensors, read_header

    files = sorted(f for part in parts for f in folder.glob(f"{part}_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no label files ({'/'.join(parts)}_*.safetensors) in {folder}")
    tables, classes = [], []
    for f in files:
        t, _ = load_tensors(f)
        meta = read_header(str(f))[1]
        if "tables" not in t or class_key not in meta:
            raise ValueError(f"{f}: not a router label file (needs tensor 'tables' and metadata '{class_key}')")
        tables.append(t["tables"])
        classes.append(int(meta[class_key]))
    return torch.stack(tables), torch.tensor(classes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ceiling of content-adaptive routing on oracle labels")
    p.add_argument("--labels", type=Path, required=True, help="folder of scripts.router_labels_toy files")
    p.add_argument("--student", type=Path, required=True, help="the student the labels were made on (block costs)")
    p.add_argument("--tokens", type=int, default=80)
    p.add_argument("--pin", type=int, nargs=2, default=(1, 1), metavar=("FIRST", "LAST"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from training.model import WanTransformer
    from training.routed import block_costs, pin_mask

    meta = WanTransformer.from_checkpoint(args.student).meta
    tables, classes = load_label_folder(args.labels)
    costs = torch.tensor(block_costs(meta, args.tokens, 16))
    pinned = pin_mask(meta.num_blocks, *args.pin)
    if tables.shape[2] != 2 ** int((~pinned).sum()):
        raise ValueError(f"{args.labels}: tables have {tables.shape[2]} masks but {int((~pinned).sum())} unpinned "
                         f"blocks need {2 ** int((~pinned).sum())}")
    result = content_headroom(tables, classes, costs, pinned)
    print(f"{tables.shape[0]} clips, classes {sorted(set(classes.tolist()))}, {tables.shape[1]} steps")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
