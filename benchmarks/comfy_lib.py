"""ComfyUI as a library, in this process: the stock loader, the pack's nodes and the stock KSampler path.

The one place that starts ComfyUI as a library (``import_comfy``): the bench's measured suites, the tests that run
ComfyUI in-process, the tiny test assets and the toy world's VAE all go through it (the core never does). The tree
is ``PARE_COMFYUI_DIR``, else the pinned 0.3.75 in the cache. It follows docs/comfyui_notes.md "ComfyUI as a library":
the ComfyUI tree goes first on ``sys.path`` (its top-level ``nodes`` module must win over this repository's
``nodes/`` package), ``args.cpu`` is set before ``comfy.model_management`` is imported, and the pack is loaded as
a package the way ComfyUI's ``load_custom_node`` does, so its relative imports work.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "comfyui-pare"))
COMFY_DIR = Path(os.environ.get("PARE_COMFYUI_DIR", CACHE / "comfyui-0.3.75"))
PACK_MODULE = "comfyui_pare_pack"  # the name the pack is imported under (ComfyUI uses the folder's path)
TIMING_KEY = "pare_bench_timing"


class ComfyNotFound(RuntimeError):
    pass


@dataclass
class Comfy:
    """Handles to the ComfyUI modules and the pack's node modules the bench uses."""

    device: str
    nodes: ModuleType  # ComfyUI's nodes.py (UNETLoader, common_ksampler)
    folder_paths: ModuleType
    mm: ModuleType  # comfy.model_management
    pe: ModuleType  # comfy.patcher_extension
    pack: dict[str, ModuleType] = field(default_factory=dict)  # pack submodules by short name

    def add_model_folder(self, kind: str, path: Path) -> None:
        self.folder_paths.add_model_folder_path(kind, str(path))


_COMFY: Comfy | None = None


def import_comfy(device: str = "cpu") -> Path:
    """Make ComfyUI's modules importable in this process, once: its tree first on ``sys.path``, argument parsing
    off, ``args.cpu`` set before ``comfy.model_management`` is first imported (it probes the device at import).
    Returns the tree. ``device``: 'cpu', or 'cuda' (taken as 'cpu' where torch has no CUDA)."""
    if not (COMFY_DIR / "comfy").is_dir():
        raise ComfyNotFound(f"no ComfyUI tree at {COMFY_DIR}; run `make env` (or set PARE_COMFYUI_DIR)")
    if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(str(COMFY_DIR)):
        raise RuntimeError("another module named 'nodes' is already imported; import ComfyUI in a fresh process")
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = device == "cpu" or not torch.cuda.is_available()
    comfy.cli_args.args.disable_api_nodes = True
    return COMFY_DIR


def load_comfy(device: str = "cpu") -> Comfy:
    """Import ComfyUI (once per process) for ``device`` ('cpu' or 'cuda') and the pack's node modules."""
    global _COMFY
    if _COMFY is not None:
        if _COMFY.device != device:
            raise RuntimeError(f"ComfyUI was already imported for {_COMFY.device} in this process, not {device}")
        return _COMFY
    import_comfy(device)
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import comfy.utils
    import folder_paths

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm lines inside timed runs
    pack = _import_pack()
    _COMFY = Comfy(device=device, nodes=nodes, folder_paths=folder_paths, mm=mm, pe=pe, pack=pack)
    return _COMFY


def _import_pack() -> dict[str, ModuleType]:
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    names = ("loaders", "routing", "routing_nodes")
    return {n: importlib.import_module(f"{PACK_MODULE}.nodes.{n}") for n in names}


# -- models --------------------------------------------------------------------------------------------------

def stock_unet(comfy: Comfy, name: str, weight_dtype: str = "default"):
    """The stock 'Load Diffusion Model' node (UNETLoader)."""
    return comfy.nodes.UNETLoader().load_unet(name, weight_dtype)[0]


def pare_unet(comfy: Comfy, name: str, weight_dtype: str = "default"):
    """PARE Load Pruned Wan."""
    return comfy.pack["loaders"].PARELoadPrunedWan.execute(name, weight_dtype).result[0]


def compute_dtype(model) -> str:
    """The dtype ComfyUI computes in for a loaded model (its manual-cast dtype, else the weights' dtype), and the
    weights' storage dtype when it differs, e.g. 'float16 (weights float8_e4m3fn)'."""
    base = model.model
    stored = base.get_dtype()
    compute = base.manual_cast_dtype or stored
    name = str(compute).removeprefix("torch.")
    scaled = getattr(base.model_config, "scaled_fp8", None)
    if scaled is not None:  # fp8_scaled file: the weights stay fp8 beside their scales, whatever get_dtype says
        return f"{name} (weights {str(scaled).removeprefix('torch.')}, scaled)"
    return name if compute == stored else f"{name} (weights {str(stored).removeprefix('torch.')})"


def apply_router(comfy: Comfy, model, router, budget: float = 1.0, pin_first: int = 1, pin_last: int = 1,
                 threshold: float | None = None):
    """PARE Apply Router: budget mode, or threshold mode when ``threshold`` is given."""
    mode = "budget" if threshold is None else "threshold"
    return comfy.pack["routing_nodes"].PAREApplyRouter.execute(
        model, router, mode=mode, budget=budget, threshold=0.5 if threshold is None else threshold,
        pin_first=pin_first, pin_last=pin_last).result[0]


def static_schedule(comfy: Comfy, model, schedule: str):
    """PARE Static Block Schedule."""
    return comfy.pack["routing_nodes"].PAREStaticSchedule.execute(model, schedule).result[0]


def with_shift(comfy: Comfy, model, shift: float = 5.0):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, shift)[0]


# -- timing --------------------------------------------------------------------------------------------------

class CallTimes:
    """An APPLY_MODEL wrapper that times every model call the sampler makes (wall clock; on CUDA the call is
    bracketed by synchronizes, so the time is the device's, at the price of one sync per call)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, executor, *args, **kwargs):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)
        return out


def timed(comfy: Comfy, model) -> tuple[object, CallTimes]:
    """A clone of ``model`` whose sampler model calls are timed (outermost APPLY_MODEL wrapper)."""
    m = model.clone()
    times = CallTimes()
    kind = comfy.pe.WrappersMP.APPLY_MODEL
    m.remove_wrappers_with_key(kind, TIMING_KEY)
    m.wrappers[kind] = {TIMING_KEY: [times], **m.wrappers.get(kind, {})}  # the first wrapper is the outermost
    return m, times


def ksample(comfy: Comfy, model, context: torch.Tensor, negative: torch.Tensor, latent: torch.Tensor,
            steps: int, cfg: float, seed: int = 0, sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """The stock KSampler's code path (``nodes.common_ksampler``) on stored conditioning tensors."""
    positive = [[context, {}]]
    neg = [[negative, {}]]
    out = comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, neg,
                                      {"samples": latent})[0]
    return out["samples"]
