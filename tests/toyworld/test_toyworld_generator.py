"""The toy world's generator, designed latent space and trajectory judge, on the generator's own videos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.sampling import process_in
from training.toyworld import evaluate, videos
from training.toyworld.latent_space import features, latent_frame_indices, target_latents

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clips_are_deterministic_and_training_never_shows_held_out_combos():
    assert [videos.clip_at(i).prompt for i in range(50)] == [videos.clip_at(i).prompt for i in range(50)]
    torch.testing.assert_close(videos.render(videos.clip_at(7)), videos.render(videos.clip_at(7)), rtol=0, atol=0)
    seen = set()
    two = 0
    for i in range(2000):
        clip = videos.clip_at(i, "train")
        two += len(clip.objects) == 2
        for o in clip.objects:
            seen.add((o.colour, o.shape, o.direction))
    assert not {(c, s) for c, s, _ in seen} & videos.HELD_OUT
    assert len(seen) == 9 * 4  # every non-held-out combo in every direction
    assert 0.1 < two / 2000 < 0.3  # two-object prompts are a minority
    assert {c.objects[0].direction for c in videos.single_clips("heldout")} == set(videos.DIRECTIONS)


def test_a_lit_scene_tells_every_token_where_and_when_it_is_and_coverage_marks_only_objects(monkeypatch):
    """Wan's RoPE is relative: only the scene's tint (videos.TINT, 0 in the shipped world) can tell a token its
    absolute place and frame."""
    assert videos.background().sub(torch.tensor(videos.BACKGROUND).view(3, 1, 1, 1)).abs().max() == 0
    monkeypatch.setattr(videos, "TINT", 0.2)
    empty = videos.background()[None]
    feat = features(empty)  # [1, 16, 5, 8, 8]
    assert feat[0, 12:].abs().max() == 0  # coverage: no object anywhere
    tokens = feat[0, :12].unfold(2, 2, 2).unfold(3, 2, 2)  # [12, 5, 4, 4, 2, 2]: Wan's 1x2x2 patches
    sig = tokens.permute(1, 2, 3, 0, 4, 5).reshape(-1, 12 * 4)  # one signature per (frame, row, column) token
    gaps = torch.cdist(sig, sig) + torch.eye(len(sig)) * 1e9
    assert gaps.min() > 0.1, gaps.min()  # every token of every frame looks different from every other
    clip = videos.clip_at(3, "train", single_only=True)
    cover = F.pixel_shuffle(features(videos.render(clip)[None])[0, 12:].transpose(0, 1), 2)[:, 0]  # [5, 16, 16]
    centre = clip.objects[0].trajectory()[latent_frame_indices(videos.FRAMES)]  # [5, 2] pixels
    cells = (torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="xy"), -1) + 0.5) * 4
    near = (cells[None] - centre[:, None, None]).abs().amax(-1) <= videos.RADIUS + 2  # 4x4-px cells the shape reaches
    assert (cover[near] > 0).float().mean() > 0.5 and (cover[~near] == 0).all()


def test_rendered_motion_follows_the_ground_truth_trajectory():
    clip = videos.clip_at(3, "train", single_only=True)
    obj = clip.objects[0]
    frames = videos.render(clip)
    c, count = evaluate.centroids(evaluate.colour_mask(frames, obj.colour))
    assert (count >= evaluate.MIN_PIXELS).all()
    gt = obj.trajectory()
    offset = c - gt  # a shape's pixel centroid sits at a fixed offset from its box centre
    assert (offset - offset[0]).abs().max() < 0.3
    assert (gt[-1] - gt[0]).abs().sum() == (videos.FRAMES - 1) * videos.STEP_PX


def test_judge_accepts_every_ground_truth_video_and_rejects_the_wrong_direction():
    for clip in videos.single_clips("seen")[::3] + videos.single_clips("heldout"):
        obj = clip.objects[0]
        frames = videos.render(clip)
        v = evaluate.judge(frames, obj)
        assert v.colour_shown and v.direction_right and v.trajectory_error_px < 1e-4, (clip.prompt, v)
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[obj.direction]
        wrong = evaluate.judge(frames, videos.ObjectSpec(obj.colour, obj.shape, opposite, obj.start))
        assert not wrong.direction_right and wrong.trajectory_error_px > 10
        other = next(c for c in videos.COLOURS if c != obj.colour)
        assert not evaluate.judge(frames, videos.ObjectSpec(other, obj.shape, obj.direction, obj.start)).colour_shown


def test_designed_latents_describe_every_fourth_frame():
    clip = videos.clip_at(11, "train")
    video = videos.render(clip)[None]
    z = target_latents(video)
    assert z.shape == (1, 16, *evaluate.LATENT_SHAPE[1:]) and latent_frame_indices(17) == [0, 4, 8, 12, 16]
    feat = process_in(z)  # what ComfyUI's Wan21 latent format hands the model
    torch.testing.assert_close(feat, features(video), rtol=1e-5, atol=1e-5)
    # Coverage is exactly zero on the empty scene and not on a cell covered by a shape.
    obj = clip.objects[0]
    x, y = obj.trajectory()[8].tolist()
    assert feat[0, 12:, 2, int(y) // 8, int(x) // 8].sum() > 1.0
    assert feat[0, 12:, 2, 0, 0].abs().sum() == 0
