"""Suite 'measured': step time through ComfyUI's real sampler (KSampler's code path), in this process.

Models with the real width of Wan2.1-1.3B at reduced depth (the 'default' profile; full depth with ``--device
cuda``), random weights. Candidates:

* ``teacher_stock``: the teacher through the stock Load Diffusion Model node (UNETLoader) - the baseline;
* ``teacher_pare``: the same file through PARE Load Pruned Wan;
* ``pruned``: the uniformly pruned student (PARE Load Pruned Wan);
* ``pruned_b<B>``: the student with PARE Apply Router at budget B (the time curve; ``pruned_b<routed_budget>`` is
  "pruned + routed"); the bench router has constant logits, so the decision set is fixed, but the router still runs
  on every model call, so its overhead is in the time;
* ``teacher_b<routed_budget>``: the teacher routed the same way;
* fp8 rows, where fp8 matrix multiplies are supported (CUDA, compute capability 8.9+; ``--fp8 on`` forces them):
  ``teacher_fp8_fast`` (stock loader, weight_dtype fp8_e4m3fn_fast), ``pruned_fp8_fast`` (PARE loader, the same
  weight dtype) and it routed at ``routed_budget``, and ``pruned_fp8_scaled`` (the student in ComfyUI's fp8_scaled
  layout, default weight dtype).

The student's widths are the tensor-core-aligned ones ``prune`` writes by default (``models.uniform_plan``); each
row records the dtype ComfyUI computes in (it picks fp16 or bf16 for the bf16 GPU checkpoints, as for a real file).

Each sampler model call is timed (an APPLY_MODEL wrapper, outermost), rounds are interleaved (benchmarks/timing.py)
and the first round is a warm-up. A step is one model call (CFG batches cond and uncond), so the step time is the
median call time of a run.
"""

from __future__ import annotations

import logging
import statistics

import torch

import comfy_library
from comfyui_pare.compute import model_block_macs, routed_fraction
from comfyui_pare.router import load_router

from . import comfy_timing
from .analytic import router_macs, step_macs
from .config import BenchConfig
from .models import PIN_FIRST, PIN_LAST, bench_files
from .timing import PeakMemory, interleaved, paired_ratios, seconds, stats

logger = logging.getLogger(__name__)
BASELINE = "teacher_stock"


def _conditioning(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(config.seed)
    ctx = torch.randn(1, config.shape.text_tokens, config.dims.text_dim, generator=gen)
    neg = torch.randn(1, config.shape.text_tokens, config.dims.text_dim, generator=gen)
    latent = torch.zeros(1, 16, *config.shape.latent)
    return ctx, neg, latent


def fp8_rows(config: BenchConfig) -> bool:
    """Whether to measure the fp8 rows: as configured, else where fp8 matmuls exist (CUDA sm 8.9+: Ada, Hopper)."""
    if config.fp8 is not None:
        return config.fp8
    return config.device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def candidates(comfy: comfy_library.Comfy, config: BenchConfig, files) -> dict[str, object]:
    """name -> ModelPatcher (shift applied), in measuring order."""
    comfy.add_model_folder("diffusion_models", files.folder)
    teacher_stock = comfy_library.stock_unet(comfy, files.teacher)
    teacher = comfy_library.pare_unet(comfy, files.teacher)
    student = comfy_library.pare_unet(comfy, files.student)
    router = load_router(files.folder / files.router)
    router.pare_name = files.router
    routed = f"b{config.routed_budget:g}"
    models = {BASELINE: teacher_stock, "teacher_pare": teacher, "pruned": student}
    for b in config.budgets:
        models[f"pruned_b{b:g}"] = comfy_library.apply_router(comfy, student, router, b, PIN_FIRST, PIN_LAST)
    models[f"teacher_{routed}"] = comfy_library.apply_router(comfy, teacher, router, config.routed_budget,
                                                         PIN_FIRST, PIN_LAST)
    if fp8_rows(config):
        fast = comfy_library.pare_unet(comfy, files.student, "fp8_e4m3fn_fast")
        models["teacher_fp8_fast"] = comfy_library.stock_unet(comfy, files.teacher, "fp8_e4m3fn_fast")
        models["pruned_fp8_fast"] = fast
        models[f"pruned_fp8_fast_{routed}"] = comfy_library.apply_router(comfy, fast, router, config.routed_budget,
                                                                      PIN_FIRST, PIN_LAST)
        models["pruned_fp8_scaled"] = comfy_library.pare_unet(comfy, files.ensure_fp8_scaled())
    return {name: comfy_library.with_shift(comfy, m, config.shape.shift) for name, m in models.items()}


def _executed(comfy: comfy_library.Comfy, model, meta, tokens: int, text_tokens: int) -> tuple[float, list[bool] | None]:
    """Executed share of the block compute in the model's last run, and the run mask of its first call."""
    template = comfy.pack["routing"].routing_template(model)
    if template is None or template.last_run is None:
        return 1.0, None
    records = template.last_run.call_records()
    if not records:
        return 1.0, None
    costs = [m.total for m in model_block_macs(meta, tokens, text_tokens)]
    masks = [row > 0 for r in records for row in r.ran]
    return routed_fraction(masks, costs), [bool(v) for v in records[0].ran[0]]


def _router_overhead(config: BenchConfig, files, device: str, repeats: int = 20) -> dict:
    """Time of one routing decision at the bench's token count (router forward + decision + its one host read)."""
    from comfyui_pare.router import DecisionTensors, RoutingPolicy, decide

    router = load_router(files.folder / files.router).to(device)
    tokens = torch.randn(2, config.shape.tokens, config.dims.dim, device=device)
    timestep = torch.full((2,), 500.0, device=device)
    costs = [m.total for m in model_block_macs(files.student_meta, config.shape.tokens, config.shape.text_tokens)]
    policy = RoutingPolicy(budget=config.routed_budget, pin_first=PIN_FIRST, pin_last=PIN_LAST)
    prepared = DecisionTensors.make(policy, costs, len(costs), tokens.device)

    def once():
        with torch.no_grad():
            return decide(router(timestep, tokens), policy, prepared=prepared).t().tolist()

    once()
    return stats([seconds(once, device) for _ in range(repeats)]).to_json()


def run(config: BenchConfig, progress=None) -> dict:
    comfy = comfy_library.load_comfy(config.device)
    files = bench_files(config.dims, config.head_fraction, config.ffn_fraction, config.seed,
                        getattr(torch, config.weights_dtype))
    models = candidates(comfy, config, files)
    ctx, neg, latent = _conditioning(config)
    names = list(models)
    timed = {name: comfy_timing.timed(comfy, m) for name, m in models.items()}
    per_run: dict[str, list[list[float]]] = {n: [] for n in names}
    peak: dict[str, int] = dict.fromkeys(names, 0)

    def sample(name: str) -> float:
        model, times = timed[name]
        times.seconds.clear()
        with PeakMemory(config.device) as mem, torch.inference_mode():
            comfy_library.ksample(comfy, model, ctx, neg, latent, config.shape.steps, config.shape.cfg, seed=config.seed)
        peak[name] = max(peak[name], mem.bytes)
        per_run[name].append(list(times.seconds))
        if len(times.seconds) != config.shape.steps:
            raise RuntimeError(f"{name}: expected {config.shape.steps} model calls, timed {len(times.seconds)}")
        return statistics.median(times.seconds)

    step_times = interleaved(names, sample, config.repeats, config.warmup, on_round=progress)
    ratios = paired_ratios(step_times, BASELINE)

    tokens, text_tokens = config.shape.tokens, config.shape.text_tokens
    metas = {BASELINE: files.teacher_meta, "teacher_pare": files.teacher_meta, "pruned": files.student_meta}
    results = {}
    for name in names:
        meta = metas.get(name, files.student_meta if name.startswith("pruned") else files.teacher_meta)
        fraction, mask = _executed(comfy, timed[name][0], meta, tokens, text_tokens)
        routed = mask is not None and not all(mask)
        macs = step_macs(meta, tokens, text_tokens, mask if routed else None, with_router=routed)
        results[name] = {"step_seconds": stats(step_times[name]).to_json(),
                         "speedup_vs_teacher": ratios[name].to_json(),
                         "executed_fraction": fraction,
                         "macs_per_forward": macs["total"],
                         "peak_memory_bytes": peak[name],
                         "weights_bytes": int(timed[name][0].model_size()),
                         "dtype": comfy_timing.compute_dtype(timed[name][0])}
    base_macs = results[BASELINE]["macs_per_forward"]
    for r in results.values():
        r["analytic_speedup"] = base_macs / r["macs_per_forward"]
        r["realized"] = r["speedup_vs_teacher"]["median"] / r["analytic_speedup"]

    pruned_time = step_times["pruned"]
    curve = []
    for b in config.budgets:
        name = f"pruned_b{b:g}"
        rel = stats([c / p for c, p in zip(step_times[name], pruned_time, strict=True)])
        curve.append({"budget": b, "executed_fraction": results[name]["executed_fraction"],
                      "time_vs_pruned": rel.to_json(),
                      "analytic_vs_pruned": results[name]["macs_per_forward"] / results["pruned"]["macs_per_forward"]})
    overhead = _router_overhead(config, files, config.device)
    routed_name = f"pruned_b{config.routed_budget:g}"
    return {
        "device": _device_name(config.device), "model": config.model,
        "dims": config.dims.to_dict(), "tokens": tokens, "text_tokens": text_tokens,
        "steps": config.shape.steps, "cfg": config.shape.cfg, "repeats": config.repeats, "warmup": config.warmup,
        "baseline": BASELINE, "candidates": results, "budget_curve": curve,
        "router_overhead": {"decision_seconds": overhead,
                            "fraction_of_step": overhead["median"] / results[routed_name]["step_seconds"]["median"],
                            # min / min: the least disturbed estimate on a loaded machine
                            "fraction_of_step_min": overhead["min"] / results[routed_name]["step_seconds"]["min"],
                            "analytic_fraction_of_step": router_macs(files.student_meta, tokens)
                            / results[routed_name]["macs_per_forward"]},
        "checkpoint_size_ratio": files.size_ratio(),
        "files": str(files.folder),
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
    except OSError:
        model = "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def table(result: dict) -> list[str]:
    d = result["dims"]
    lines = [f"Measured through ComfyUI's KSampler on {result['device']}: dim {d['dim']}, {d['num_heads']} heads, FFN "
             f"{d['ffn_dim']}, {d['num_layers']} blocks, {result['tokens']} tokens, CFG {result['cfg']:g} (batch 2), "
             f"{result['steps']} steps x {result['repeats']} interleaved rounds after {result['warmup']} warm-up",
             f"{'candidate':21} {'step min':>9} {'median':>9} {'spread':>7} {'speedup':>8} {'analytic':>8} "
             f"{'realized':>8} {'executed':>8} {'peak MB':>8}  dtype"]
    for name, r in result["candidates"].items():
        s = r["step_seconds"]
        lines.append(f"{name:21} {s['min']:>8.3f}s {s['median']:>8.3f}s {s['spread']:>6.0%} "
                     f"{r['speedup_vs_teacher']['median']:>7.2f}x {r['analytic_speedup']:>7.2f}x {r['realized']:>8.2f} "
                     f"{r['executed_fraction']:>8.0%} {r['peak_memory_bytes'] / 2**20:>8.0f}  {r.get('dtype', '')}")
    lines.append("Time curve of the pruned student under PARE Apply Router (time relative to the unrouted student):")
    for c in result["budget_curve"]:
        lines.append(f"  budget {c['budget']:<5g} executed {c['executed_fraction']:>5.0%}  time {c['time_vs_pruned']['median']:.2f}"
                     f" (min {c['time_vs_pruned']['min']:.2f})  analytic {c['analytic_vs_pruned']:.2f}")
    o = result["router_overhead"]
    lines.append(f"Router overhead: {o['decision_seconds']['median'] * 1e3:.2f} ms per decision (min "
                 f"{o['decision_seconds']['min'] * 1e3:.2f}) = {o['fraction_of_step']:.3%} of a routed step (min/min "
                 f"{o.get('fraction_of_step_min', 0):.3%}; analytic {o['analytic_fraction_of_step']:.4%}); "
                 f"checkpoint size ratio {result['checkpoint_size_ratio']:.3f}")
    return lines
