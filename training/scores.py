"""Head types and type-adjusted importance (docs/method.md, "Width"), shared by calibrate and prune.

Head type from the intra-slice attention ratio r (attention mass a query puts on keys of its own latent frame):
spatial if r >= the spatial threshold (0.7), temporal if r <= the temporal threshold (0.3), mixed otherwise.

Raw importance is biased against temporal heads (their outputs are smaller while they carry the motion), so the
ranking uses an adjusted score, chosen by ``protection``:

* ``normalize`` (default): each score divided by the mean raw score of its type over all blocks, so every type's
  average head scores 1 before the global ranking;
* ``scale:<k>``: temporal heads' scores multiplied by k;
* ``none``: raw scores (magnitude only).
"""

from __future__ import annotations

import torch

SPATIAL, TEMPORAL, MIXED = 0, 1, 2
TYPE_NAMES = ("spatial", "temporal", "mixed")
PROTECTIONS = "normalize | scale:<k> | none"


def classify(ratio: torch.Tensor, spatial: float = 0.7, temporal: float = 0.3) -> torch.Tensor:
    """int8 head types (0 spatial, 1 temporal, 2 mixed) from intra-slice ratios."""
    if not 0.0 <= temporal < spatial <= 1.0:
        raise ValueError(f"thresholds must satisfy 0 <= temporal ({temporal}) < spatial ({spatial}) <= 1")
    types = torch.full(ratio.shape, MIXED, dtype=torch.int8)
    types[ratio >= spatial] = SPATIAL
    types[ratio <= temporal] = TEMPORAL
    return types


def parse_protection(text: str) -> tuple[str, float]:
    """'normalize' -> ('normalize', 1); 'scale:2.5' -> ('scale', 2.5); 'none' -> ('none', 1)."""
    if text in ("normalize", "none"):
        return text, 1.0
    if text.startswith("scale:"):
        try:
            k = float(text.split(":", 1)[1])
        except ValueError:
            k = -1.0
        if k > 0:
            return "scale", k
    raise ValueError(f"temporal protection must be {PROTECTIONS}, got {text!r}")


def adjust_importance(raw: torch.Tensor, types: torch.Tensor, protection: str = "normalize") -> torch.Tensor:
    """Scores used for the global head ranking, from raw importance [L, H] and head types [L, H]."""
    mode, k = parse_protection(protection)
    raw = raw.double()
    if mode == "none":
        return raw
    if mode == "scale":
        return torch.where(types == TEMPORAL, raw * k, raw)
    out = raw.clone()
    for t in (SPATIAL, TEMPORAL, MIXED):
        sel = types == t
        if sel.any():
            out[sel] = raw[sel] / raw[sel].mean().clamp_min(1e-30)
    return out
