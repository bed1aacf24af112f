"""Is a router alive? Live hidden units and the spread of its decisions over inputs and over steps.

A router whose output no longer depends on its inputs is a static schedule that costs a pooling pass: the first
toy router ended that way (every hidden unit's pre-activation below -3.6 on every input, so every logit was the
output bias at every step and for every prompt). Training reports this for every router it makes and refuses to
finish with one; ``python -m comfyui_pare inspect-router`` reports it for a router file.

Inputs: the router's logits on a grid of I inputs x S steps ([I, S, N]) and, optionally, its hidden
pre-activations on the same inputs. Measured:

* ``live_units``: share of hidden units whose pre-activation reaches SiLU's curved region (> ``LIVE_PREACT``) on at
  least one input and varies across the inputs;
* ``logit_spread_inputs`` / ``logit_spread_steps``: the largest range of an unpinned block's logit across the inputs
  at one step / across the steps for one input;
* ``decision_spread_inputs`` / ``decision_spread_steps``: the share of (probe threshold, step, block) cells whose
  run/skip decision differs between inputs, and of (threshold, input, block) cells whose decision differs between
  steps; the probe thresholds run 25%, 50% and 75% of the unpinned cells of the grid, and a cell whose logits lie
  within ``SENSITIVE`` of each other does not count (a flip there is rounding noise around a constant);
* ``collapsed``: neither range reaches ``SENSITIVE`` logits: the output is constant over these inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import PareError

LIVE_PREACT = -2.0  # SiLU(x) is flat (|slope| < 0.1) below about -2.5: a unit that never gets above it is dead
SENSITIVE = 0.05  # logit range that counts as a dependence (decisions move at thresholds within it)
PROBES = (0.25, 0.5, 0.75)


class RouterCollapsed(PareError):
    """A trained router whose output does not depend on its inputs."""


@dataclass(frozen=True)
class RouterHealth:
    live_units: float
    logit_spread_inputs: float
    logit_spread_steps: float
    decision_spread_inputs: float
    decision_spread_steps: float
    inputs: int
    steps: int

    @property
    def timestep_sensitive(self) -> bool:
        return self.logit_spread_steps >= SENSITIVE

    @property
    def content_sensitive(self) -> bool:
        return self.logit_spread_inputs >= SENSITIVE

    @property
    def collapsed(self) -> bool:
        return not (self.timestep_sensitive or self.content_sensitive)

    def to_json(self) -> dict:
        return {**asdict(self), "timestep_sensitive": self.timestep_sensitive,
                "content_sensitive": self.content_sensitive, "collapsed": self.collapsed}

    def describe(self) -> str:
        state = "COLLAPSED (constant output)" if self.collapsed else "alive"
        return (f"router {state} on {self.inputs} inputs x {self.steps} steps: live hidden units "
                f"{100 * self.live_units:.0f}%, timestep-sensitive {'yes' if self.timestep_sensitive else 'no'} "
                f"(logit range {self.logit_spread_steps:.3g}, decisions differ in {100 * self.decision_spread_steps:.0f}% "
                f"of cells), content-sensitive {'yes' if self.content_sensitive else 'no'} (logit range "
                f"{self.logit_spread_inputs:.3g}, decisions differ in {100 * self.decision_spread_inputs:.0f}% of cells)")


@torch.no_grad()
def health_from_logits(logits: torch.Tensor, preactivations: torch.Tensor | None = None,
                       pinned: torch.Tensor | None = None) -> RouterHealth:
    """``logits`` [I, S, N] (inputs x steps x blocks); ``preactivations`` [M, H] on the same inputs; ``pinned``
    bool [N] (blocks that always run: not judged)."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [inputs, steps, blocks], got {list(logits.shape)}")
    i, s, n = logits.shape
    free = torch.ones(n, dtype=torch.bool) if pinned is None else ~pinned.cpu().bool()
    z = logits.float().cpu()[:, :, free]
    range_inputs = float((z.amax(0) - z.amin(0)).max()) if i > 1 else 0.0
    range_steps = float((z.amax(1) - z.amin(1)).max()) if s > 1 else 0.0
    flat = z.reshape(-1)
    d_in = d_st = 0.0
    wide_in = (z.amax(0) - z.amin(0)) >= SENSITIVE  # a flip within rounding noise of a constant is not a decision
    wide_st = (z.amax(1) - z.amin(1)) >= SENSITIVE
    for q in PROBES:
        thr = torch.quantile(flat, 1.0 - q)
        run = z > thr
        d_in += float((run.any(0) & ~run.all(0) & wide_in).float().mean()) / len(PROBES)
        d_st += float((run.any(1) & ~run.all(1) & wide_st).float().mean()) / len(PROBES)
    live = 1.0
    if preactivations is not None and preactivations.numel():
        pre = preactivations.float().cpu()
        varies = (pre.amax(0) - pre.amin(0)) > 1e-4 if pre.shape[0] > 1 else torch.ones(pre.shape[1], dtype=torch.bool)
        live = float(((pre.amax(0) > LIVE_PREACT) & varies).float().mean())
    return RouterHealth(live_units=live, logit_spread_inputs=range_inputs, logit_spread_steps=range_steps,
                        decision_spread_inputs=d_in, decision_spread_steps=d_st, inputs=i, steps=s)


@torch.no_grad()
def router_health(router, timesteps: torch.Tensor, tokens: torch.Tensor, text: torch.Tensor | None,
                  pinned: torch.Tensor | None = None) -> RouterHealth:
    """Health of ``router`` (a ``BlockRouter``) on I inputs x S ``timesteps``: ``tokens`` [I, S, L, dim] (the
    patch-embedded latent at each step) and ``text`` [I, Lt, text_dim] (or None for a router without text)."""
    i, s = tokens.shape[:2]
    t = timesteps.reshape(1, s).expand(i, s).reshape(-1)
    tok = tokens.reshape(i * s, *tokens.shape[2:])
    txt = None
    if router.spec.text_dim and text is not None:
        txt = text[:, None].expand(i, s, *text.shape[1:]).reshape(i * s, *text.shape[1:])
    logits = router(t, tok, txt).reshape(i, s, -1)
    pre = router.hidden_preactivations(t, tok, txt)
    return health_from_logits(logits, pre, pinned)
