"""ComfyUI as a library, in this process: the stock loader, the pack's nodes and the stock KSampler path.

The one place that starts ComfyUI as a library (``import_comfy``): the bench's measured suites, the tests that run
ComfyUI in-process, the tiny test assets and the toy world's VAE all go through it (the shipped pack never does:
ComfyUI imports the pack, not the other way round). It sits at the bottom of the repository's import graph, beside
``comfyui_pare``: it imports no project module (the pack is loaded from its folder by path, as ComfyUI loads
it), so training, scripts, benchmarks and tests all use it from below. The tree is
``PARE_COMFYUI_DIR``, else the pinned 0.3.75 in the cache. It follows docs/comfyui_notes.md "ComfyUI as a library":
the ComfyUI tree goes first on ``sys.path`` (its top-level ``nodes`` module must win over this repository's
``nodes/`` package), ``args.cpu`` is set before ``comfy.model_management`` is imported, and the pack is loaded as
a package the way ComfyUI's ``load_custom_node`` does, so its relative imports work.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "comfyui-pare"))
COMFY_DIR = Path(os.environ.get("PARE_COMFYUI_DIR", CACHE / "comfyui-0.3.75"))
PACK_MODULE = "comfyui_pare_pack"  # the name the pack is imported under (ComfyUI uses the folder's path)


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
        # The one sys.path edit in the repository: ComfyUI is not an installable package, its modules (``comfy``,
        # ``folder_paths``, its top-level ``nodes``) import each other as top-level names from its tree, and that
        # ``nodes`` must win over this repository's ``nodes/`` package, so the tree goes first.
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


def ksample(comfy: Comfy, model, context: torch.Tensor, negative: torch.Tensor, latent: torch.Tensor,
            steps: int, cfg: float, seed: int = 0, sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """The stock KSampler's code path (``nodes.common_ksampler``) on stored conditioning tensors."""
    positive = [[context, {}]]
    neg = [[negative, {}]]
    out = comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, neg,
                                      {"samples": latent})[0]
    return out["samples"]
