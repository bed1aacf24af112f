"""VDMini's pieces in training/: which blocks static depth pruning removes (training/depth.py) and the content /
motion-consistency losses (training/icmd.py), on constructed cases with known answers."""

from __future__ import annotations

import pytest
import torch

from comfyui_pare.compute import block_macs
from comfyui_pare.errors import PareFormatError
from comfyui_pare.wan import BlockWidth
from training.depth import DepthOptions, choose_kept_blocks
from training.icmd import content_loss, icmd_terms, motion_loss, velocity_motion_loss
from training.tiny import TINY_T2V

F, S, D = 5, 16, 8  # latent frames, tokens per frame, channels


def moving_features(seed: int = 0) -> torch.Tensor:
    """Teacher token states [1, F * S, D]: a fixed random pattern rolled one token further every frame."""
    pattern = torch.randn(S, D, generator=torch.Generator().manual_seed(seed))
    return torch.stack([pattern.roll(f, 0) for f in range(F)]).reshape(1, F * S, D)


def test_frozen_student_has_higher_motion_loss_than_moving_one():
    teacher = moving_features()
    frames = teacher.reshape(F, S, D)
    # Frozen: every frame is a right frame of the teacher (the first one), but nothing moves.
    frozen = frames[:1].expand(F, S, D).reshape(1, F * S, D)
    # Moving: each frame carries the same content error (an offset pattern), so it moves exactly like the teacher.
    offset = 0.3 * torch.randn(S, D, generator=torch.Generator().manual_seed(1))
    moving = (frames + offset).reshape(1, F * S, D)
    assert motion_loss(frozen, teacher, F) > 0.5
    assert motion_loss(moving, teacher, F) == pytest.approx(0.0, abs=1e-6)
    assert content_loss(moving, teacher, F) > 0.05  # the content term sees the moving student's per-frame error
    assert content_loss(teacher, teacher, F) == 0 and motion_loss(teacher, teacher, F) == 0
    # The same on predicted velocities [B, C, F, H, W].
    v_teacher = teacher.reshape(1, F, 4, 4, D).permute(0, 4, 1, 2, 3)
    v_frozen = frozen.reshape(1, F, 4, 4, D).permute(0, 4, 1, 2, 3)
    v_moving = moving.reshape(1, F, 4, 4, D).permute(0, 4, 1, 2, 3)
    assert velocity_motion_loss(v_frozen, v_teacher) > 0.5
    assert velocity_motion_loss(v_moving, v_teacher) == pytest.approx(0.0, abs=1e-6)


def test_content_loss_is_per_frame_relative():
    """A frame 100x smaller than the others counts as much as they do: the error is relative per frame."""
    teacher = moving_features().reshape(F, S, D).clone()
    teacher[2] *= 0.01
    student = teacher.clone()
    student[2] *= 2  # 100% error on the small frame only
    loss = content_loss(student.reshape(1, F * S, D), teacher.reshape(1, F * S, D), F)
    assert loss == pytest.approx(1.0 / F, rel=1e-5)


def test_icmd_matches_student_blocks_to_their_teacher_blocks():
    teacher_states = [moving_features(seed=s) for s in range(7)]  # input + 6 block outputs
    kept = [0, 2, 3, 5]
    student_states = [teacher_states[0]] + [teacher_states[j + 1] for j in kept]
    terms = icmd_terms(student_states, teacher_states, kept, F)
    assert float(terms["content"]) == 0 and float(terms["motion_feature"]) == 0
    shifted = icmd_terms(student_states, teacher_states, [0, 1, 2, 3], F)  # the wrong pairing is penalised
    assert shifted["content"] > 0.1 and shifted["motion_feature"] > 0.1
    with pytest.raises(ValueError, match="5 student states for 3 blocks"):
        icmd_terms(student_states, teacher_states, [0, 1, 2], F)


def contributions(values) -> torch.Tensor:
    return torch.tensor([values, [v * 2 for v in values]])  # two timesteps, same order


def test_block_choice_shallow_and_contribution_orders():
    c = contributions([0.5, 0.30, 0.10, 0.40, 0.01, 0.9])  # block 4 is the least important, but deep
    dims = TINY_T2V
    assert choose_kept_blocks(c, DepthOptions(remove=2), dims) == (0, 3, 4, 5)  # shallow: blocks 1-2 only
    assert choose_kept_blocks(c, DepthOptions(remove=2, order="contribution"), dims) == (0, 1, 3, 5)
    assert choose_kept_blocks(c, DepthOptions(remove=1, order="contribution", pin_ends=False), dims) == (0, 1, 2, 3, 5)
    with pytest.raises(PareFormatError, match="only 2 blocks are candidates"):
        choose_kept_blocks(c, DepthOptions(remove=3), dims)
    with pytest.raises(PareFormatError, match="exactly one of"):
        choose_kept_blocks(c, DepthOptions(), dims)
    with pytest.raises(PareFormatError, match="has 5 blocks, the teacher has 6"):
        choose_kept_blocks(c[:, :5], DepthOptions(remove=1), dims)


def test_compute_target_counts_the_widths():
    dims = TINY_T2V
    c = contributions([0.5, 0.30, 0.10, 0.40, 0.01, 0.9])
    # Full width: each block is 1/6 of the compute; 0.6 needs 3 blocks gone (0.5), 0.7 needs 2 (0.667).
    assert choose_kept_blocks(c, DepthOptions(compute_target=0.7, order="contribution"), dims) == (0, 1, 3, 5)
    assert len(choose_kept_blocks(c, DepthOptions(compute_target=0.6, order="contribution"), dims)) == 3
    # Width-pruned blocks: the fraction counts their real cost (r of a full block each), so a target just under r
    # takes exactly one block away.
    narrow = [BlockWidth(tuple(range(2)), tuple(range(128)))] * 6
    opts = DepthOptions(compute_target=0.5, order="contribution")
    r = block_macs(dims, narrow[0], opts.tokens).total / block_macs(dims, BlockWidth.full(dims), opts.tokens).total
    assert r < 0.5
    target = DepthOptions(compute_target=0.9 * r, order="contribution")
    assert choose_kept_blocks(c, target, dims, narrow) == (0, 1, 2, 3, 5)
    assert choose_kept_blocks(c, opts, dims, narrow) == tuple(range(6))
    with pytest.raises(PareFormatError, match="leaves 0.667 of the teacher's compute"):
        choose_kept_blocks(c, DepthOptions(compute_target=0.5), dims)
