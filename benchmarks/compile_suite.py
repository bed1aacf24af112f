"""Suite 'compile': PARE routing under torch.compile, through ComfyUI's real sampler.

The routed student (a timestep-switch router, so the decision changes during sampling: the case that would make a
traced decision recompile every step) is sampled eagerly, under the stock TorchCompileModel node (whole diffusion
model) and under per-block compile (ComfyUI's ``set_torch_compile_wrapper`` with one key per block, what video
users' per-block compile nodes do). Per variant: the first run's time (compile included), graphs compiled after the
first model call (0 = no recompile per step), the steady step time (interleaved with eager), and the largest
difference from the eager routed result (routing kept: the block calls match and the output is the eager one).
Backend: ``--compile-backend`` (default inductor; on the CPU it needs a C compiler, gcc here).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

import comfy_library
from comfyui_pare.router import BlockRouter, RouterSpec

from . import comfy_timing
from .config import BenchConfig
from .models import bench_files
from .timing import interleaved, stats

logger = logging.getLogger(__name__)
VARIANTS = ("eager", "TorchCompileModel", "per-block")


def switch_router(num_blocks: int, dim: int) -> BlockRouter:
    """Early (noisy) steps skip the middle blocks' first half, late steps their second half."""
    mid = list(range(1, num_blocks - 1))
    early = [-5.0 if i in mid[: len(mid) // 2] else 5.0 for i in range(num_blocks)]
    late = [-5.0 if i in mid[len(mid) // 2:] else 5.0 for i in range(num_blocks)]
    return BlockRouter.timestep_switch(RouterSpec(num_blocks=num_blocks, dim=dim), 700.0, early, late)


def _compiled(comfy: comfy_library.Comfy, model, how: str, backend: str, num_blocks: int):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    if how == "TorchCompileModel":
        return TorchCompileModel.execute(model, backend).result[0]
    m = model.clone()
    set_torch_compile_wrapper(m, backend=backend, keys=[f"diffusion_model.blocks.{i}" for i in range(num_blocks)])
    return m


def run(config: BenchConfig, progress=None) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    comfy = comfy_library.load_comfy(config.device)
    files = bench_files(config.dims, config.head_fraction, config.ffn_fraction, config.seed,
                        getattr(torch, config.weights_dtype))
    comfy.add_model_folder("diffusion_models", files.folder)
    student = comfy_library.pare_unet(comfy, files.student)
    router = switch_router(config.dims.num_layers, config.dims.dim)
    routed = comfy_library.apply_router(comfy, student, router, threshold=0.5, pin_first=0, pin_last=0)
    template = comfy.pack["routing"].routing_template(routed)
    gen = torch.Generator().manual_seed(config.seed)
    ctx, neg = (torch.randn(1, config.shape.text_tokens, config.dims.text_dim, generator=gen) for _ in range(2))
    latent = torch.zeros(1, 16, *config.shape.latent)
    steps = config.compile_steps

    graphs: list[int] = []

    def count(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return out

    def sample(model) -> tuple[torch.Tensor, list[float], float]:
        timed, times = comfy_timing.timed(comfy, comfy_library.with_shift(comfy, model, config.shape.shift))
        timed.add_wrapper_with_key(comfy.pe.WrappersMP.APPLY_MODEL, "pare_bench_graphs", count)
        start = time.perf_counter()
        with torch.inference_mode():
            out = comfy_library.ksample(comfy, timed, ctx, neg, latent, steps, config.shape.cfg, seed=config.seed)
        return out, times.seconds, time.perf_counter() - start

    plain, _, _ = sample(student)
    reference, _, _ = sample(routed)
    eager_blocks = template.last_run.block_calls
    models = {"eager": routed}
    results: dict[str, dict] = {"eager": {}}
    for how in VARIANTS[1:]:
        torch._dynamo.reset()
        counters.clear()
        graphs.clear()
        models[how] = _compiled(comfy, routed, how, config.compile_backend, config.dims.num_layers)
        out, _, first = sample(models[how])  # compiles
        first_graphs = list(graphs)
        out2, _, _ = sample(models[how])  # a second run: must reuse everything
        scale = reference.std().item() or 1.0
        results[how] = {
            "first_run_seconds": first,
            "graphs_after_first_call": first_graphs[0] if first_graphs else 0,
            "recompiles_after_first_call": (graphs[-1] - first_graphs[0]) if first_graphs else 0,
            "graphs_per_call": list(graphs),
            "max_diff_vs_eager_routed": max((out - reference).abs().max().item(), (out2 - reference).abs().max().item())
            / scale,
            "max_diff_routed_vs_unrouted": (reference - plain).abs().max().item() / scale,
            "block_calls_match": template.last_run.block_calls == eager_blocks,
        }
    step = interleaved(list(models), lambda name: statistics.median(sample(models[name])[1]),
                       max(2, config.repeats // 2), warmup=1, on_round=progress)
    for how in models:
        results.setdefault(how, {})["step_seconds"] = stats(step[how]).to_json()
        results[how]["speedup_vs_eager"] = stats([e / v for e, v in zip(step["eager"], step[how], strict=True)]).to_json()
    return {"backend": config.compile_backend, "steps": steps, "tokens": config.shape.tokens,
            "dims": config.dims.to_dict(), "variants": results}


def table(result: dict) -> list[str]:
    lines = [f"Routing under torch.compile ({result['backend']}), routed student with a timestep-switch router, "
             f"{result['steps']} steps, {result['tokens']} tokens",
             f"{'variant':18} {'first run':>9} {'graphs':>6} {'recompiles':>10} {'step median':>11} {'vs eager':>8} "
             f"{'max diff':>9} {'routed':>6}"]
    for name, v in result["variants"].items():
        s = v["step_seconds"]
        if name == "eager":
            lines.append(f"{name:18} {'':>9} {'':>6} {'':>10} {s['median']:>10.3f}s {1.0:>7.2f}x {'':>9} {'':>6}")
            continue
        lines.append(f"{name:18} {v['first_run_seconds']:>8.1f}s {v['graphs_after_first_call']:>6} "
                     f"{v['recompiles_after_first_call']:>10} {s['median']:>10.3f}s "
                     f"{v['speedup_vs_eager']['median']:>7.2f}x {v['max_diff_vs_eager_routed']:>9.1e} "
                     f"{'yes' if v['block_calls_match'] else 'NO':>6}")
    lines.append("  (max diff: largest |compiled - eager routed| over the output std; routing changes the output by "
                 f"{next(iter(v['max_diff_routed_vs_unrouted'] for v in result['variants'].values() if 'max_diff_routed_vs_unrouted' in v), 0):.2f} std)")
    return lines
