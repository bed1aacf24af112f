"""Fit a budget-conditioned block router to oracle labels (``training.router_oracle``) on a frozen student.

The router's logits are ``prior(t) + MLP(features) + bias`` (``comfyui_pare.router``, format 2): the prior starts as a
searched static schedule's skip order (``prior_from_order``), so before any fitting the router *is* that schedule at
every budget of the threshold family; the fit then moves cells per step and per input where the labels say a
different mask costs less.

Objective, for every budget b of ``FitConfig.budgets`` with its own learned threshold theta_b: each unpinned block of
each row runs with probability sigmoid((logit - theta_b) / tau), independently, so the probability of every mask of
the unpinned blocks is known exactly and the expected squared CFG error of an input is ``P_c^T E P_u`` over its
label table E (cond mask x uncond mask). The loss is the sum over budgets of that expected error (relative to the
prior's at the start) plus ``budget_weight`` x (expected spend - b)^2. The decisions at inference are the hard
ones (``decide`` with the calibrated threshold), so tau falls over the fit to make the soft policy nearly hard.

The learning rate is small and the features are normalised (LayerNorm): the health check (``comfyui_pare.
router_health``) runs on the validation inputs at every evaluation and the fit fails on a collapsed router.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from comfyui_pare.router import BlockRouter
from comfyui_pare.router_health import RouterCollapsed, health_from_logits

logger = logging.getLogger(__name__)


@dataclass
class FitConfig:
    budgets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    steps: int = 600
    learning_rate: float = 3e-3  # Adam; measured to keep the hidden units alive (issue 28: 0.03 killed them)
    prior_learning_rate: float = 3e-2
    weight_decay: float = 1e-4
    budget_weight: float = 200.0
    clip_budget_weight: float = 20.0  # per clip: keeps a prompt's own spend near the budget (content moves cells)
    tau_start: float = 1.0
    tau_end: float = 0.3
    eval_every: int = 100
    seed: int = 0
    learn_prior: bool = True


@dataclass
class LabelSet:
    """Fitting inputs. Rows r = (clip, step). ``tables`` [R, M, M]; ``timesteps`` [R]; ``cond`` [R, Lt, text_dim]
    (the prompt's context), ``uncond`` [Lt, text_dim] (the empty prompt's); ``weights`` [R] per-row weight."""

    tables: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    weights: torch.Tensor
    groups: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # clip id per row (health: inputs x steps)
    # Pooled content tokens per row ([R, 2 * dim]: mean and std over tokens), cond and uncond rows; None for a
    # router that reads no tokens.
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None


def prior_from_order(rank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Prior logits [K, N] from a skip order: ``rank`` [K, N] is the position at which a static search skipped cell
    (knot k, block n) (0 first; a large value for cells it never skipped, inf for pinned blocks). Lower rank, lower
    logit, so every threshold skips a prefix of the search's order: the static schedule of that compute."""
    r = rank.float().clone()
    finite = torch.isfinite(r)
    top = float(r[finite].max()) if finite.any() else 0.0
    r[~finite] = top + 8.0
    return scale * (r - top / 2.0)


def per_clip(values: torch.Tensor, clip_of: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of ``values`` [R] per clip ([n])."""
    return torch.zeros(n, dtype=values.dtype).index_add(0, clip_of, values)


def mask_probabilities(p: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """[R, M]: probability of every mask (rows of ``bits`` [M, U], 1 = runs) with independent run probabilities
    ``p`` [R, U]."""
    logp, log1m = torch.log(p.clamp_min(1e-12)), torch.log((1 - p).clamp_min(1e-12))
    b = bits.to(p.dtype)
    return torch.exp(logp @ b.T + log1m @ (1 - b).T)


def tokens_from_pooled(pooled: torch.Tensor) -> torch.Tensor:
    """Two tokens [R, 2, dim] whose mean and population std over tokens are ``pooled`` [R, 2 * dim]'s halves, so the
    router's own pooling reproduces the stored statistics exactly."""
    mean, std = pooled.float().chunk(2, dim=1)
    return torch.stack([mean + std, mean - std], dim=1)


def _logits(router: BlockRouter, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    if pooled is None or not router.spec.token_input:
        tokens = torch.zeros(t.shape[0], 1, router.spec.dim)  # a router without token input only checks the width
    else:
        tokens = tokens_from_pooled(pooled)
    return router(t, tokens, text)


def row_logits(router: BlockRouter, data: "LabelSet") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the cond rows and of the uncond rows of ``data``."""
    unc = data.uncond[None].expand(data.timesteps.shape[0], -1, -1)
    return (_logits(router, data.timesteps, data.cond, data.pooled_cond),
            _logits(router, data.timesteps, unc, data.pooled_uncond))


def fit_router(router: BlockRouter, train: LabelSet, val: LabelSet, costs: torch.Tensor, pinned: torch.Tensor,
               cfg: FitConfig) -> dict:
    """Fit ``router`` in place; returns the log (per evaluation: losses, spends, health)."""
    torch.manual_seed(cfg.seed)
    n = costs.numel()
    unpinned = [i for i in range(n) if not bool(pinned[i])]
    u = len(unpinned)
    bits = ((torch.arange(2 ** u)[:, None] >> torch.arange(u)[None]) & 1).float()  # [M, U]: mask m runs bit j
    c = costs.double() / costs.double().sum()
    c_free, c_pin = c[unpinned].float(), float(c[pinned].sum())
    thetas = torch.nn.Parameter(torch.zeros(len(cfg.budgets)))
    mlp = [p for name, p in router.named_parameters() if not name.startswith("prior_") and p.requires_grad]
    groups = [{"params": mlp, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
              {"params": [thetas], "lr": cfg.prior_learning_rate, "weight_decay": 0.0}]
    if cfg.learn_prior and router.spec.prior_knots:
        groups.append({"params": [router.prior_logits], "lr": cfg.prior_learning_rate, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    clip_of = torch.unique(train.groups, return_inverse=True)[1]
    n_clips = int(clip_of.max()) + 1

    def row_errors(data: LabelSet, tau: float) -> list[torch.Tensor]:
        lc, lu = row_logits(router, data)
        out = []
        for k in range(len(cfg.budgets)):
            pc = torch.sigmoid((lc[:, unpinned] - thetas[k]) / tau)
            pu = torch.sigmoid((lu[:, unpinned] - thetas[k]) / tau)
            out.append(torch.einsum("rm,rmk,rk->r", mask_probabilities(pc, bits), data.tables,
                                    mask_probabilities(pu, bits)))
        return out

    def hard_thresholds() -> torch.Tensor:
        """Per budget, the threshold whose hard decisions on the training rows spend closest to it (what the
        budget calibration does on other inputs)."""
        lc, lu = row_logits(router, train)
        z = torch.cat([lc[:, unpinned], lu[:, unpinned]])
        cand = torch.unique(z.flatten())
        cand = torch.cat([cand - 1e-4, cand[-1:] + 1e-4])
        spend = c_pin + ((z[None] > cand[:, None, None]).float() @ c_free).mean(1)  # [C]
        return torch.stack([cand[(spend - b).abs().argmin()] for b in cfg.budgets])

    def evaluate(data: LabelSet, tau: float, hard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lc, lu = row_logits(router, data)
        errs, spends = [], []
        th = hard_thresholds() if hard else thetas
        for k in range(len(cfg.budgets)):
            zc, zu = (lc[:, unpinned] - th[k]) / tau, (lu[:, unpinned] - th[k]) / tau
            pc, pu = (zc > 0).float() if hard else torch.sigmoid(zc), (zu > 0).float() if hard else torch.sigmoid(zu)
            e = torch.einsum("rm,rmk,rk->r", mask_probabilities(pc, bits), data.tables, mask_probabilities(pu, bits))
            errs.append((e * data.weights).sum() / data.weights.sum())
            spends.append(c_pin + 0.5 * ((pc + pu) @ c_free).mean())
        return torch.stack(errs), torch.stack(spends), lc, lu

    with torch.no_grad():  # thresholds that spend each budget under the starting logits; the reference errors
        lc = row_logits(router, train)[0]
        for k, b in enumerate(cfg.budgets):
            lo, hi = float(lc.min()) - 20, float(lc.max()) + 20
            for _ in range(60):
                mid = (lo + hi) / 2
                thetas[k] = mid
                s = evaluate(train, cfg.tau_start, False)[1][k]
                lo, hi = (mid, hi) if s > b else (lo, mid)
        ref_clip = torch.stack([per_clip(e * train.weights, clip_of, n_clips) for e in row_errors(train, cfg.tau_start)])
        ref_val_hard = evaluate(val, 1.0, True)[0].detach()
    budgets = torch.tensor(cfg.budgets)
    history = []
    for step in range(cfg.steps + 1):
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                v_err, v_spend, lc_v, _ = evaluate(val, tau, True)
                s_err, s_spend = evaluate(shuffled_content(val), tau, True)[:2]
                health = _val_health(router, val)
            row = {"step": step, "tau": tau, "val_hard_error_vs_start": (v_err / ref_val_hard).tolist(),
                   "val_hard_spend": v_spend.tolist(), "val_shuffled_error_vs_start": (s_err / ref_val_hard).tolist(),
                   "val_shuffled_spend": s_spend.tolist(), "thresholds": thetas.detach().tolist(), **health.to_json()}
            history.append(row)
            logger.info("fit step %d: val error vs start %s, spend %s; content shuffled %s; live units %.2f, decision "
                        "spread inputs %.3f, steps %.3f", step, [round(x, 3) for x in row["val_hard_error_vs_start"]],
                        [round(x, 3) for x in row["val_hard_spend"]],
                        [round(x, 3) for x in row["val_shuffled_error_vs_start"]], health.live_units,
                        health.decision_spread_inputs, health.decision_spread_steps)
        if step == cfg.steps:
            break
        lc, lu = row_logits(router, train)
        loss = torch.zeros(())
        for k in range(len(cfg.budgets)):
            pc = torch.sigmoid((lc[:, unpinned] - thetas[k]) / tau)
            pu = torch.sigmoid((lu[:, unpinned] - thetas[k]) / tau)
            e = torch.einsum("rm,rmk,rk->r", mask_probabilities(pc, bits), train.tables, mask_probabilities(pu, bits))
            row_spend = c_pin + 0.5 * ((pc + pu) @ c_free)
            clip_err = per_clip(e * train.weights, clip_of, n_clips)
            clip_spend = per_clip(row_spend, clip_of, n_clips) / per_clip(torch.ones_like(row_spend), clip_of, n_clips)
            # Per clip, the log of its error against the prior's: a clip whose error doubles costs as much as any
            # other clip whose error doubles, so no prompt is starved for a small absolute gain elsewhere (measured:
            # with the plain sum, single-object prompts lost their motion at 0.4).
            loss = loss + torch.log(clip_err / ref_clip[k]).mean() \
                + cfg.budget_weight * (row_spend.mean() - budgets[k]).square() \
                + cfg.clip_budget_weight * (clip_spend - budgets[k]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = history[-1]
    if final["collapsed"]:
        raise RouterCollapsed(f"the fitted router is collapsed on its {val.timesteps.shape[0]} validation inputs "
                              f"(live units {final['live_units']:.2f}, decision spread {final['logit_spread_inputs']:.2g} "
                              "across inputs, {final['logit_spread_steps']:.2g} across steps); lower the learning rate")
    return {"history": history, "thresholds": thetas.detach().tolist(), "budgets": list(cfg.budgets)}


def shuffled_content(data: LabelSet) -> LabelSet:
    """The control: every row reads the content features (text, pooled tokens of both rows) of the same step of
    the next clip, so only the content is shuffled, never the step."""
    ids = torch.unique(data.groups)
    nxt = {int(g): int(ids[(k + 1) % len(ids)]) for k, g in enumerate(ids.tolist())}
    rows = {int(g): torch.nonzero(data.groups == g).flatten() for g in ids}
    other = torch.empty_like(data.groups, dtype=torch.long)
    for g, r in rows.items():
        o = rows[nxt[g]]
        other[r] = o[torch.arange(len(r)).clamp_max(len(o) - 1)]
    def pick(t):
        return None if t is None else t[other]
    return dataclasses.replace(data, cond=data.cond[other], pooled_cond=pick(data.pooled_cond),
                               pooled_uncond=pick(data.pooled_uncond))


def _val_health(router: BlockRouter, val: LabelSet):
    """Router health on the validation rows, arranged inputs x steps by ``val.groups``."""
    ids = torch.unique(val.groups)
    rows = [torch.nonzero(val.groups == g).flatten() for g in ids]
    s = min(len(r) for r in rows)
    index = torch.stack([r[:s] for r in rows])  # [I, S]
    flat = index.flatten()
    t, text = val.timesteps[flat], val.cond[flat]
    pooled = None if val.pooled_cond is None else val.pooled_cond[flat]
    logits = _logits(router, t, text, pooled).reshape(len(rows), s, -1)
    tokens = torch.zeros(t.shape[0], 1, router.spec.dim) if pooled is None else tokens_from_pooled(pooled)
    pre = router.hidden_preactivations(t, tokens, text)
    return health_from_logits(logits, pre)


def step_weight(sigmas: torch.Tensor) -> torch.Tensor:
    """A row weight per step: 1 (the static search's proxy weighs every step alike)."""
    return torch.ones_like(sigmas)


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))
