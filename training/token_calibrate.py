"""asymrnr-calibrate: measure per-block, per-timestep token redundancy on the user's own model and write a
token-reduction schedule for the PARE Token Reduction node.

``python -m training asymrnr-calibrate --model M --samples DIR --out schedule.json`` runs this module (the
node pack's CLI starts it as a program, so the pack never imports training). Steps:

1. Load the teacher or a PARE student (``WanTransformer``, any per-block widths) and the calibration samples
   (``comfyui_pare.calibration``, the format shared with ``python -m training calibrate``).
2. For each sample, walk the sampling schedule (``--steps`` shifted flow sigmas): with a stored clean latent the
   input at each step is the noised latent (the forward process, exact); without one, the model's own Euler
   trajectory from the sample's seeded noise (cond only).
3. At every block, the self-attention's queries (after RoPE) and values are measured
   (``comfyui_pare.token_calibration.RedundancyTable``); the table becomes a schedule at the target ratios.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from comfyui_pare.calibration import list_samples, read_sample
from comfyui_pare.errors import PareError
from comfyui_pare.token_calibration import RedundancyTable, schedule_from_redundancy
from comfyui_pare.token_schedule import save_schedule

from .model import WanTransformer, apply_rope
from .sampling import Conditioning, flow_sigmas, initial_noise, noise_scaling, process_in, sample_euler

logger = logging.getLogger(__name__)
HELP = "measure token redundancy per block and timestep (AsymRnR) and write a token-reduction schedule"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="teacher or PARE student .safetensors")
    p.add_argument("--samples", required=True, help="folder of calibration samples (.safetensors)")
    p.add_argument("--out", required=True, help="schedule JSON to write (atomically)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps measured (default 20)")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift of the sampling schedule (default 5.0)")
    p.add_argument("--target-q", type=float, default=0.4, help="mean query reduction ratio to reach (default 0.4)")
    p.add_argument("--target-kv", type=float, default=0.2,
                   help="mean key/value reduction ratio to reach (default 0.2)")
    p.add_argument("--max-ratio", type=float, default=0.7, help="ratio where reduction is on (default 0.7)")
    p.add_argument("--stride", default="1,2,2", help="destination stride frames,rows,columns (default 1,2,2)")
    p.add_argument("--mode", choices=("mean", "prune"), default="mean", help="merge (mean) or drop (prune)")
    p.add_argument("--max-samples", type=int, default=0, help="use at most this many samples (0 = all)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def _stride(text: str) -> tuple[int, int, int]:
    try:
        stride = tuple(int(s) for s in text.split(","))
    except ValueError:
        stride = ()
    if len(stride) != 3 or min(stride) < 1:
        raise PareError(f"--stride must be three positive integers 'frames,rows,columns', got {text!r}")
    return stride


def sigma_to_percent(sigma: float, shift: float) -> float:
    """Inverse of ComfyUI's ``percent_to_sigma`` for Wan's shifted flow: sigma = shift t / (1 + (shift - 1) t),
    percent = 1 - t."""
    return 1.0 - sigma / (shift - (shift - 1.0) * sigma)


class _Probe:
    """Forward pre-hooks on every block's self-attention that measure its queries and values."""

    def __init__(self, model: WanTransformer, table: RedundancyTable) -> None:
        self.table, self.step, self.grid = table, 0, (1, 1, 1)
        self.handles = [block.self_attn.register_forward_pre_hook(self._hook(i))
                        for i, block in enumerate(model.blocks)]

    def _hook(self, index: int):
        def hook(attn, args):
            x, freqs = args
            b, s = x.shape[:2]
            q = apply_rope(attn.norm_q(attn.q(x)).view(b, s, attn.num_heads, attn.head_dim), freqs)
            v = attn.v(x).view(b, s, attn.num_heads, attn.head_dim)
            self.table.add("q", index, self.step, q.transpose(1, 2), self.grid)
            self.table.add("kv", index, self.step, v.transpose(1, 2), self.grid)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    stride = _stride(args.stride)
    if args.steps < 1:
        raise PareError(f"--steps must be positive, got {args.steps}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = WanTransformer.from_checkpoint(args.model, dtype=dtype, device=device)
    files = list_samples(args.samples)
    if args.max_samples > 0:
        files = files[:args.max_samples]
    sigmas = flow_sigmas(args.steps, args.shift)
    table = RedundancyTable(model.num_blocks, args.steps, stride)
    probe = _Probe(model, table)
    try:
        for path in tqdm(files, desc="asymrnr-calibrate", unit="sample"):
            sample = read_sample(path)
            if model.dims.variant == "i2v" and sample.clip_fea is None:
                raise PareError(f"{path}: an I2V model needs 'clip_fea' in every calibration sample")
            shape = (1, *sample.latent_shape)
            if model.dims.in_dim != shape[1]:
                raise PareError(f"{path}: latent has {shape[1]} channels but the model takes {model.dims.in_dim} "
                                "(I2V calibration with the image concat is not supported; use a T2V model)")
            t, h, w = sample.latent_shape[1:]
            probe.grid = (t, -(-h // 2), -(-w // 2))
            cond = Conditioning(sample.context[None].to(device),
                                None if sample.clip_fea is None else sample.clip_fea[None].to(device))
            noise = initial_noise(shape, sample.seed).to(device)
            _measure(model, probe, cond, noise, sigmas, sample.latent)
    finally:
        probe.close()
    percents = [sigma_to_percent(float(s), args.shift) for s in sigmas[:-1]]
    schedule = schedule_from_redundancy(
        table.mean(), percents, args.target_q, args.target_kv, args.max_ratio, stride=stride, mode=args.mode,
        name=f"calibrated on {args.model}",
        info={"model": str(args.model), "samples": len(files), "steps": args.steps, "shift": args.shift})
    save_schedule(args.out, schedule)
    logger.info("wrote %s: %d rules for %d blocks x %d steps from %d samples", args.out, len(schedule.rules),
                model.num_blocks, args.steps, len(files))
    return 0


@torch.no_grad()
def _measure(model: WanTransformer, probe: _Probe, cond: Conditioning, noise: torch.Tensor, sigmas: torch.Tensor,
             latent: torch.Tensor | None) -> None:
    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(x.to(noise.dtype), sigma * 1000.0, cond.context, cond.clip_fea).float()

    if latent is not None:  # the forward process at each step: no trajectory to integrate
        clean = process_in(latent[None].to(noise))
        for i, sigma in enumerate(sigmas[:-1]):
            probe.step = i
            velocity(noise_scaling(sigma, noise, clean), sigma.reshape(1))
        return

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        probe.step = int((sigmas - sigma[0]).abs().argmin())
        return x - velocity(x, sigma) * sigma.reshape(-1, 1, 1, 1, 1)

    sample_euler(denoise, noise_scaling(sigmas[0], noise, torch.zeros_like(noise)), sigmas.to(noise.device))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # program entry point only
    parser = argparse.ArgumentParser(prog="python -m training asymrnr-calibrate", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (PareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
