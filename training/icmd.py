"""VDMini's recovery losses for a depth-pruned student: Individual Content and Motion Dynamics (ICMD) distillation.

VDMini (shallow blocks carry per-frame content, deep blocks carry motion) recovers a student with removed blocks
with two terms, both against the teacher:

* **content** (Individual Content Distillation): every student block's output is matched, frame by frame, to the
  output of the teacher block it was copied from (student block i <-> teacher block ``kept_blocks[i]``). Per latent
  frame the squared error is divided by the teacher frame's mean square, so every frame and every block counts
  alike whatever its scale.
* **motion** (multi-frame motion consistency): the same matching on *frame differences*, x[f + 1] - x[f], of the
  block features and of the predicted velocities. A student whose frames are each right but which does not move
  the way the teacher does is penalised here, and only here.

The paper's motion term is adversarial (a discriminator on multi-frame features); this module implements the
direct regression form above. An adversarial term is an option of the config that is refused as not implemented.

Token states are [B, L, D] with L = F x H' x W' in frame-major order (``WanTransformer``'s layout); velocities are
[B, C, F, H, W].
"""

from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-8


def frames_of(tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, F * S, D] frame-major tokens -> [B, F, S * D]."""
    b, length = tokens.shape[:2]
    if length % num_frames:
        raise ValueError(f"{length} tokens do not split into {num_frames} latent frames")
    return tokens.reshape(b, num_frames, -1)


def _relative_per_frame(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows and frames of ||s_f - t_f||^2 / ||t_f||^2, for [B, F, N] inputs (float32)."""
    s, t = student.float(), teacher.float()
    err = (s - t).pow(2).mean(-1)
    scale = t.pow(2).mean(-1).clamp_min(EPS)
    return (err / scale).mean()


def frame_differences(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[f + 1] - x[f] along the frame axis ``dim``."""
    n = x.shape[dim]
    return x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)


def content_loss(student: torch.Tensor, teacher: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-frame relative feature error of one matched block pair (token states [B, L, D])."""
    return _relative_per_frame(frames_of(student, num_frames), frames_of(teacher, num_frames))


def motion_loss(student: torch.Tensor, teacher: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Relative error of the frame differences of one matched block pair (token states [B, L, D]); 0 for one frame."""
    if num_frames < 2:
        return student.new_zeros((), dtype=torch.float32)
    return _relative_per_frame(frame_differences(frames_of(student, num_frames)),
                               frame_differences(frames_of(teacher, num_frames)))


def velocity_motion_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative error of the frame differences of predicted velocities [B, C, F, H, W]."""
    if student.shape[2] < 2:
        return student.new_zeros((), dtype=torch.float32)
    ds, dt = (frame_differences(v.float(), dim=2).transpose(1, 2).flatten(2) for v in (student, teacher))
    return _relative_per_frame(ds, dt)


def matched_outputs(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                    teacher_blocks: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student block i's output, teacher block ``teacher_blocks[i]``'s output) pairs.

    ``*_states`` are ``WanTransformer(..., return_hidden_states=True)``'s lists: the input of every block, then the
    last block's output, so block i's output is entry i + 1.
    """
    if len(student_states) != len(teacher_blocks) + 1:
        raise ValueError(f"{len(student_states)} student states for {len(teacher_blocks)} blocks")
    return [(student_states[i + 1], teacher_states[j + 1]) for i, j in enumerate(teacher_blocks)]


def icmd_terms(student_states: Sequence[torch.Tensor] | None, teacher_states: Sequence[torch.Tensor] | None,
               teacher_blocks: Sequence[int], num_frames: int, pred: torch.Tensor | None = None,
               target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The content and feature-motion terms (with states), each averaged over the matched blocks, and the
    velocity-motion term (with velocities)."""
    out = {}
    if student_states is not None and teacher_states is not None:
        pairs = matched_outputs(student_states, teacher_states, teacher_blocks)
        out["content"] = torch.stack([content_loss(s, t, num_frames) for s, t in pairs]).mean()
        out["motion_feature"] = torch.stack([motion_loss(s, t, num_frames) for s, t in pairs]).mean()
    if pred is not None and target is not None:
        out["motion_velocity"] = velocity_motion_loss(pred, target)
    return out
