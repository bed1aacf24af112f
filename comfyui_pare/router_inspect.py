"""``python -m comfyui_pare inspect router.safetensors --samples DIR``: a router file's spec, budget calibration and
health (``router_health``) on a few calibration samples.

The router is run as the node runs it, once per sample at every step of a ``steps``-step shifted flow schedule, on
the sample's text context (``PARE Save Calibration Sample`` files) and, for a router that reads the latent, on the
sample's latent noised to each step and patch-embedded with ``--student``'s patch embedding. Without ``--student``
(or without a stored latent) such a router reads stand-in Gaussian tokens, which is enough to tell a constant router
from a live one, not to judge its content sensitivity; the report says which was used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .calibration import list_samples, read_sample
from .router import load_router
from .router_budget import read_budget_calibration
from .router_health import health_from_logits
from .wan_reader import open_wan

MAX_SAMPLES = 8
PATCH = (1, 2, 2)


def flow_timesteps(steps: int, shift: float) -> torch.Tensor:
    """Timesteps (sigma * 1000) of a ``steps``-step schedule with the flow ``shift`` (ComfyUI's ModelSamplingSD3)."""
    s = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    return 1000.0 * shift * s / (1.0 + (shift - 1.0) * s)


def _patch_embedding(student: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    with open_wan(student) as reader:
        return reader.dequantized("patch_embedding.weight"), reader.dequantized("patch_embedding.bias")


@torch.no_grad()
def inspect_router(path: str | os.PathLike, samples: str | os.PathLike | None = None,
                   student: str | os.PathLike | None = None, steps: int = 10, shift: float = 5.0,
                   seed: int = 0) -> dict:
    """The report (JSON-ready): spec, budget calibration summary and, with ``samples``, health."""
    router = load_router(path)
    spec = router.spec
    cal = read_budget_calibration(path)
    report: dict = {"file": str(path), "router": spec.to_json(), "parameters": sum(p.numel() for p in router.parameters()),
                    "budget_calibration": None if cal is None else {
                        "budgets": list(cal.budgets), "validated": cal.describe_validated(), "note": cal.note}}
    if samples is None:
        report["health"] = None
        report["health_note"] = "pass --samples (calibration samples) to measure the router's health"
        return report
    if steps < 2:
        raise ValueError(f"--steps must be at least 2 to judge timestep sensitivity, got {steps}")
    files = list_samples(samples)[:MAX_SAMPLES]
    items = [read_sample(f) for f in files]
    embed = _patch_embedding(student) if (student is not None and spec.token_input) else None
    ts = flow_timesteps(steps, shift)
    gen = torch.Generator().manual_seed(seed)
    logits, pre, tokens_from = [], [], set()
    pinned = torch.zeros(spec.num_blocks, dtype=torch.bool)
    if cal is not None:
        pinned[:cal.pin_first] = True
        if cal.pin_last:
            pinned[spec.num_blocks - cal.pin_last:] = True
    for item in items:
        if spec.text_dim and item.context.shape[-1] != spec.text_dim:
            raise ValueError(f"{item.path}: context is {item.context.shape[-1]}-wide, the router reads "
                             f"{spec.text_dim}-wide text")
        if embed is not None and item.latent is not None:
            x0 = item.latent.float()[None].expand(steps, *item.latent.shape)
            sig = (ts / 1000.0)[:, None, None, None, None]
            x = (1 - sig) * x0 + sig * torch.randn(x0.shape, generator=gen)
            tok = F.conv3d(x, embed[0].float(), embed[1].float(), stride=PATCH).flatten(2).transpose(1, 2)
            tokens_from.add("student patch embedding of the noised latent")
        else:
            tok = torch.randn(steps, 16, spec.dim, generator=gen)
            tokens_from.add("stand-in Gaussian tokens" if spec.token_input else "not read by this router")
        txt = item.context.float()[None].expand(steps, -1, -1) if spec.text_dim else None
        logits.append(router(ts, tok, txt))
        pre.append(router.hidden_preactivations(ts, tok, txt))
    health = health_from_logits(torch.stack(logits), torch.cat(pre), pinned)
    report["health"] = health.to_json()
    report["health_summary"] = health.describe()
    report["health_inputs"] = {"samples": [Path(f).name for f in files], "steps": steps, "shift": shift,
                               "tokens": sorted(tokens_from)}
    return report
