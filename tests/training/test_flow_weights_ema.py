"""Our SD3 timestep density, loss weights and EMA against diffusers' own (``diffusers.training_utils``, a dev
dependency imported only here): the training processes no longer import diffusers, so these independent
implementations pin the same draws, weights and averages bit for bit."""

from __future__ import annotations

import pytest
import torch

from training.ema import EMA
from training.flow_weights import WEIGHTING_SCHEMES, sd3_loss_weights, timestep_density

training_utils = pytest.importorskip("diffusers.training_utils")


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_timestep_density_and_loss_weights_equal_diffusers(scheme):
    kw = dict(logit_mean=0.3, logit_std=1.7, mode_scale=0.8)
    ours = timestep_density(scheme, 64, generator=torch.Generator().manual_seed(7), **kw)
    theirs = training_utils.compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(7),
                                                                   **kw)
    assert ours.shape == (64,) and torch.equal(ours, theirs)
    sigmas = ours.clamp(1e-5, 1.0)
    weights = sd3_loss_weights(scheme, sigmas)
    assert torch.equal(weights, training_utils.compute_loss_weighting_for_sd3(scheme, sigmas))
    if scheme in ("sigma_sqrt", "cosmap"):  # the weighting schemes weigh; the others are all ones
        assert weights.std() > 0
    else:
        assert torch.equal(weights, torch.ones_like(sigmas))


@pytest.mark.parametrize("decay", [0.5, 0.999])
def test_ema_steps_and_copy_equal_diffusers_ema_model(decay):
    """Twelve steps cover the first step (decay 0), the warm-up (1 + k) / (10 + k) and, for 0.5, the cap; a frozen
    parameter is copied rather than averaged."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    params.append(frozen)
    ours = EMA(params, decay=decay)
    theirs = training_utils.EMAModel(params, decay=decay)
    for n in range(12):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ours.step(params)
        theirs.step(params)
        assert ours.optimization_step == theirs.optimization_step == n + 1
        assert ours.get_decay(n + 1) == theirs.cur_decay_value
        for a, b in zip(ours.shadow_params, theirs.shadow_params):
            assert torch.equal(a, b)
    assert torch.equal(ours.shadow_params[2], frozen)
    assert not torch.equal(ours.shadow_params[0], params[0])
    # the checkpoint keeps these two keys, as diffusers' state_dict names them, so existing checkpoints resume
    state = theirs.state_dict()
    assert (ours.decay, ours.optimization_step) == (state["decay"], state["optimization_step"])
    targets = [torch.zeros_like(p) for p in params]
    ours.copy_to(targets)
    assert all(torch.equal(t, s) for t, s in zip(targets, theirs.shadow_params))


def test_ema_rejects_a_different_parameter_list():
    ema = EMA([torch.zeros(2)], decay=0.9)
    with pytest.raises(ValueError, match="2 parameters, the average holds 1"):
        ema.step([torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA([torch.zeros(2)], decay=1.0)
