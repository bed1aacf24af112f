"""The toy world's deterministic video generator: coloured shapes moving along known straight trajectories.

Each video is 17 frames (4k + 1, like Wan) of 64x64 RGB on a plain grey background. An object is one of 4 colours
x 3 shapes, moving left/right/up/down by ``STEP_PX`` pixels per frame. Every object starts near a fixed point on the
side opposite its direction of travel (a few pixels of jitter) and crosses half the frame, so the named direction
decides almost the whole trajectory. Two-object prompts ("... and ...") are a minority; their objects travel in
separate lanes.

``TINT`` > 0 lights the scene instead (red rising left to right, blue top to bottom, green over the clip): the
landmarks and clock a Wan model lacks on a plain background (RoPE is relative, the patch embedding position-free).
The shipped world uses 0; training/README.md ("Motion experiments") has what 0.2 measured.

Some colour/shape combinations are held out of training (with every direction) so that tests can check the teacher
composes words it never saw together. Everything is a pure function of an integer index and a split name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

FRAMES, SIZE = 17, 64
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.95), "yellow": (0.95, 0.9, 0.1),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (0.5, 0.5, 0.5)  # the scene's mean colour; ``background`` tints each pixel by TINT
TINT = 0.0  # peak-to-peak tint of each scene gradient (red across x, blue down y, green over time); 0: plain grey
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
RADIUS = 7.0  # half the side of the shape's bounding box, in pixels
STEP_PX = 2.0  # 16 steps of 2 px: 32 px, half the frame (4 latent cells of 8 px)
JITTER_PX = 3.0
TWO_OBJECT_FRACTION = 0.2
SPLIT_SEEDS = {"train": 0, "seen": 1_000_003, "heldout": 2_000_003}


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    direction: str
    start: tuple[float, float]  # (x, y) of the centre in pixels at frame 0

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def trajectory(self) -> torch.Tensor:
        """Ground-truth centre per frame [FRAMES, 2] as (x, y) pixels."""
        dx, dy = DIRECTIONS[self.direction]
        t = torch.arange(FRAMES, dtype=torch.float32) * STEP_PX
        return torch.stack([self.start[0] + dx * t, self.start[1] + dy * t], dim=1)


@dataclass(frozen=True)
class Clip:
    objects: tuple[ObjectSpec, ...]

    @property
    def prompt(self) -> str:
        return " and ".join(o.phrase() for o in self.objects)


def combos(split: str) -> list[tuple[str, str]]:
    """Colour/shape combinations of a split: "train"/"seen" use the non-held-out ones, "heldout" the others."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split in ("train", "seen"):
        return [cs for cs in every if cs not in HELD_OUT]
    if split == "heldout":
        return [cs for cs in every if cs in HELD_OUT]
    raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")


def start_point(direction: str, lane: float = 0.0, jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """Start near the fixed point opposite the direction of travel, shifted sideways by ``lane`` pixels."""
    dx, dy = DIRECTIONS[direction]
    half = (FRAMES - 1) * STEP_PX / 2
    c = SIZE / 2
    x = c - dx * half + (lane if dx == 0 else 0.0) + jitter[0]
    y = c - dy * half + (lane if dy == 0 else 0.0) + jitter[1]
    return (x, y)


def make_object(colour: str, shape: str, direction: str, rng: random.Random, lane: float = 0.0) -> ObjectSpec:
    jitter = (rng.uniform(-JITTER_PX, JITTER_PX), rng.uniform(-JITTER_PX, JITTER_PX))
    return ObjectSpec(colour, shape, direction, start_point(direction, lane, jitter))


def clip_at(index: int, split: str = "train", single_only: bool = False) -> Clip:
    """The ``index``-th clip of a split (deterministic). Single-object clips cycle through every combo x direction."""
    pool = combos(split)
    rng = random.Random(SPLIT_SEEDS[split] + 7919 * index)
    dirs = list(DIRECTIONS)
    if single_only or rng.random() >= TWO_OBJECT_FRACTION:
        colour, shape = pool[(index // len(dirs)) % len(pool)]
        return Clip((make_object(colour, shape, dirs[index % len(dirs)], rng),))
    # Two objects in separate lanes (one above/left of the centre line, one below/right), different colours.
    (c1, s1), (c2, s2) = rng.sample(pool, 2)
    while c2 == c1:
        c2, s2 = rng.choice(pool)
    d1, d2 = rng.choice(dirs), rng.choice(dirs)
    return Clip((make_object(c1, s1, d1, rng, lane=-12.0), make_object(c2, s2, d2, rng, lane=12.0)))


def single_clips(split: str) -> list[Clip]:
    """One jitter-free single-object clip per combo x direction of a split (the evaluation set)."""
    return [Clip((ObjectSpec(c, s, d, start_point(d)),)) for (c, s) in combos(split) for d in DIRECTIONS]


_SS = 4
_COORDS = (torch.arange(SIZE * _SS, dtype=torch.float32) + 0.5) / _SS
_GRID = torch.meshgrid(_COORDS, _COORDS, indexing="xy")  # (x, y) of every sub-pixel


def _mask(shape: str, cx: float, cy: float) -> torch.Tensor:
    """Anti-aliased coverage [SIZE, SIZE] of a shape centred at (cx, cy) (4x supersampled)."""
    u, v = _GRID[0] - cx, _GRID[1] - cy
    if shape == "circle":
        inside = u * u + v * v <= RADIUS * RADIUS
    elif shape == "square":
        inside = (u.abs() <= RADIUS * 0.85) & (v.abs() <= RADIUS * 0.85)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        inside = (v <= RADIUS) & (v >= -RADIUS) & (u.abs() <= (v + RADIUS) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return inside.float().reshape(SIZE, _SS, SIZE, _SS).mean(dim=(1, 3))


def background(frames: list[int] | None = None, size: int = SIZE, tint: float | None = None) -> torch.Tensor:
    """The empty scene [3, len(frames), size, size] (all FRAMES by default): BACKGROUND tinted by ``tint``
    (default TINT) per axis."""
    frames = list(range(FRAMES)) if frames is None else frames
    tint = TINT if tint is None else tint
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5  # [-0.5, 0.5) across the frame
    t = torch.tensor(frames, dtype=torch.float32) / (FRAMES - 1) - 0.5
    bg = torch.tensor(BACKGROUND).view(3, 1, 1, 1).expand(3, len(frames), size, size).clone()
    bg[0] += tint * ramp.view(1, 1, size)
    bg[1] += tint * t.view(-1, 1, 1)
    bg[2] += tint * ramp.view(1, size, 1)
    return bg


def render(clip: Clip, frames: list[int] | None = None) -> torch.Tensor:
    """Video [3, FRAMES, SIZE, SIZE] in [0, 1]; with ``frames``, only those frames ([3, len(frames), SIZE, SIZE])."""
    frames = list(range(FRAMES)) if frames is None else frames
    video = background(frames)
    for obj in clip.objects:
        colour = torch.tensor(COLOURS[obj.colour]).view(3, 1, 1)
        path = obj.trajectory()
        for i, f in enumerate(frames):
            m = _mask(obj.shape, *path[f].tolist())
            video[:, i] = video[:, i] * (1 - m) + colour * m
    return video


def parse_prompt(prompt: str) -> Clip:
    """The clip (jitter-free starts) a single- or two-object prompt of the toy grammar describes."""
    parts = prompt.strip().lower().split(" and ")
    objs = []
    for k, part in enumerate(parts):
        words = part.split()
        if len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLOURS \
                or words[2] not in SHAPES or words[4] not in DIRECTIONS:
            raise ValueError(f"not a toy prompt: {part!r} (expected 'a <colour> <shape> moving <direction>')")
        lane = 0.0 if len(parts) == 1 else (-12.0 if k == 0 else 12.0)
        objs.append(ObjectSpec(words[1], words[2], words[4], start_point(words[4], lane)))
    return Clip(tuple(objs))
