"""Salient-cell loss weights: count the latent cells where the clip's content is (or is about to be) more.

Why: in a video whose subject covers a few percent of the frame, a plain mean-squared flow-matching or
distillation loss is almost all background, and where the subject goes next (its motion) is a sliver of the
gradient. A cell is salient when its clean latent departs from the clip's per-channel median (its background) by
more than ``threshold`` in any channel, in this latent frame or an adjacent one (so the place it moves to counts
too). Used by the toy teacher's object-weighted loss and by ``flow.salient_weight`` in stages 1 and 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def salient_weights(x0: torch.Tensor, extra: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-cell weights [B, 1, T, H, W] for clean latents ``x0`` [B, C, T, H, W]: 1 + ``extra`` on salient cells,
    1 elsewhere."""
    if x0.dim() != 5:
        raise ValueError(f"salient_weights: x0 must be [B, C, T, H, W], got shape {list(x0.shape)}")
    background = x0.flatten(2).median(dim=2).values[:, :, None, None, None]
    salient = ((x0 - background).abs().amax(dim=1, keepdim=True) > threshold).to(x0.dtype)
    near = F.max_pool3d(salient, kernel_size=(3, 1, 1), stride=1, padding=(1, 0, 0))
    return 1.0 + extra * near
