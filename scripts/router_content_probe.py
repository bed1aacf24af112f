"""Which content input lets the toy router adapt to content: fit one router per input on the oracle labels
(``scripts/router_labels_toy.py``, train/val parts) and score it on the validation clips against the same router
reading another clip's content (``training.router_fit.shuffled_content``).

    python -m scripts.router_content_probe --labels /tmp/router_labels [--steps 400]

Inputs (each beside the timestep, the prior being the searched static order as in ``router_fit_toy``):

* ``timestep only``: no content;
* ``text (cond row)``: the pooled prompt text: what the shipped router reads; the uncond row reads the empty prompt;
* ``latent into block 0``: the pooled patch-embedded noisy latent, both rows (what ``token_input`` reads at runtime);
* ``block 0 output``: the pooled output of block 0, both rows (would need the decision after block 0);
* ``text (both rows)``: the prompt's pooled text on the uncond row too;
* ``object count``: the true number of objects, both rows: a perfect content label, the best case for this world.

Prints a markdown table of validation error against the prior's (hard decisions at each budget), and the
shuffled-content control's. Only a probe: nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from scripts.router_fit_toy import PIN, REPO, WEIGHTS, label_set, prior_router

log = logging.getLogger("router_content_probe")
INPUTS = ("timestep only", "text (cond row)", "latent into block 0", "block 0 output", "text (both rows)",
          "object count")


@torch.no_grad()
def block0_output(student, text, folder: Path, part: str) -> torch.Tensor:
    """[rows, 2 * dim]: the pooled output of block 0 for each label row (the label's clip and noise re-made)."""
    from comfyui_pare.safetensors_io import load_tensors, read_header
    from training.sampling import process_in
    from training.toyworld import videos
    from training.toyworld.latent_space import frame_features, latent_frame_indices, to_vae_space

    keep = latent_frame_indices(videos.FRAMES)
    out = []
    for f in sorted(folder.glob(f"{part}_*.safetensors")):
        t, _ = load_tensors(f)
        meta = read_header(str(f))[1]
        i = int(meta["index"])
        clip = videos.clip_at(i, "train" if meta["split"] == "train" else "seen")
        x0 = process_in(to_vae_space(frame_features(videos.render(clip, keep)[None], keep)))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(90_000 + i))  # as router_labels_toy
        s = t["sigmas"][:, None, None, None, None]
        x = (1 - s) * x0 + s * noise
        p = student.prepare(x, t["sigmas"] * 1000, text([clip.prompt]).expand(x.shape[0], -1, -1))
        h = student.run_block(0, p.tokens, p)
        out.append(torch.cat([h.mean(1), h.std(1, unbiased=False)], 1))
    return torch.cat(out)


def with_content(data, name: str, block0: torch.Tensor, dim: int, objects: list[int]):
    """``data`` with the pooled-token slots holding the content input ``name`` (the same on both CFG rows)."""
    steps = data.timesteps.shape[0] // len(objects)
    if name == "block 0 output":
        pooled = block0
    elif name == "text (both rows)":
        pooled = torch.zeros(data.timesteps.shape[0], 2 * dim)
        pooled[:, :data.cond.shape[2]] = data.cond.float().mean(1)
    elif name == "object count":
        pooled = torch.zeros(data.timesteps.shape[0], 2 * dim)
        pooled[torch.arange(len(pooled)), torch.tensor(objects).repeat_interleave(steps)] = 1.0
    else:
        return data
    return dataclasses.replace(data, pooled_cond=pooled, pooled_uncond=pooled)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from comfyui_pare.toy_text import ToyTextEncoder
    from training.model import WanTransformer
    from training.routed import block_costs, pin_mask
    from training.router_fit import FitConfig, fit_router

    if not any(args.labels.glob("val_*.safetensors")):
        raise SystemExit(f"{args.labels}: no val_*.safetensors labels (run scripts.router_labels_toy to the end)")
    student = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student.safetensors").eval()
    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    meta = student.meta
    with torch.no_grad():
        uncond = text([""])[0]
    sets = {}
    for part in ("train", "val"):
        data, md = label_set(args.labels, part, uncond, token_input=True)
        sets[part] = (data, block0_output(student, text, args.labels, part), [int(m["objects"]) for m in md])
    costs = torch.tensor(block_costs(meta, 80, 16))
    cfg = FitConfig(steps=args.steps)
    print("| router input | " + " | ".join(f"{b:g}" for b in cfg.budgets) + " | content shuffled |")
    print("|---|" + "---|" * len(cfg.budgets) + "---|")
    for name in INPUTS:
        train, val = (with_content(sets[part][0], name, sets[part][1], meta.dims.dim, sets[part][2])
                      for part in ("train", "val"))
        torch.manual_seed(0)
        router = prior_router(meta, REPO / "docs" / "toy_budget_curve.json", 32, text_input=name == "text (cond row)",
                              token_input=name not in ("timestep only", "text (cond row)"))
        last = fit_router(router, train, val, costs, pin_mask(meta.num_blocks, *PIN), cfg)["history"][-1]
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in last["val_hard_error_vs_start"]) + " | " +
              " ".join(f"{x:.3f}" for x in last["val_shuffled_error_vs_start"]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
