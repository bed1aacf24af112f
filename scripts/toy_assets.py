"""The toy world's shipped weights (training/toyworld/weights/) and the API graph that samples them in ComfyUI.

`install(base)` copies the five files into a ComfyUI base directory under the names the docs and workflows use;
`toy_graph(...)` is the ordinary ComfyUI graph of the toy world: PARE Load Pruned Wan (teacher or student)
[-> PARE Apply Router] -> ModelSamplingSD3 -> KSampler with PARE Toy Text Encode prompts -> VAEDecode ->
SaveAnimatedWEBP, plus SaveLatent (and the routing report's heat map for a routed student).
"""

from __future__ import annotations

import filecmp
import re
import shutil
from pathlib import Path

from comfyui_pare.compute import model_block_macs, tokens_for
from comfyui_pare.wan_reader import read_meta
from training.toyworld.videos import FRAMES, SIZE

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "training" / "toyworld" / "weights"

TEACHER = "pare_toy_teacher.safetensors"
STUDENT = "pare_toy_student.safetensors"
ROUTER = "pare_toy_router.safetensors"
VAE = "pare_toy_vae.safetensors"
TEXT = "pare_toy_text.safetensors"
FOLDERS = {TEACHER: "diffusion_models", STUDENT: "diffusion_models", ROUTER: "pare_routers", VAE: "vae",
           TEXT: "text_encoders"}

# The toy world's sampler settings (the teacher was trained with flow shift 3).
STEPS, CFG, SHIFT, SAMPLER, SCHEDULER = 20, 4.0, 3.0, "euler", "simple"
TEXT_TOKENS = 16  # the toy text encoder's context length (umT5's is 512)


def install(base: Path, weights: Path = WEIGHTS) -> list[Path]:
    """Copy the shipped toy weights into ``base``/models/...; returns the installed paths."""
    missing = [name for name in FOLDERS if not (weights / name).exists()]
    if missing:
        raise FileNotFoundError(f"toy weights missing in {weights}: {missing} (rebuild them with "
                                "`python -m training toyworld rebuild --out DIR` and copy DIR's files there)")
    paths = []
    for name, folder in FOLDERS.items():
        dest = base / "models" / folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() or not filecmp.cmp(weights / name, dest, shallow=False):
            shutil.copyfile(weights / name, dest)
        paths.append(dest)
    return paths


def node_defaults(object_info: dict, node: str) -> dict:
    """The default of every widget input of ``node`` (a combo without one: its first option), from /object_info:
    what a user gets by adding the node and leaving its knobs alone."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in object_info[node]["input"].get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(spec[0], list) and spec[0]:
                out[name] = spec[0][0]
            elif spec[0] == "COMBO" and opts.get("options"):
                out[name] = opts["options"][0]
    return out


def toy_graph(prompt: str, seed: int, routed: bool, prefix: str, decode: bool = True,
              router_knobs: dict | None = None, shift: float = SHIFT, cfg: float = CFG) -> dict:
    """API-format graph. ``routed``: the PARE student behind PARE Apply Router with ``router_knobs`` (pass
    ``node_defaults(object_info, "PAREApplyRouter")`` for the node as added); otherwise the teacher. ``shift`` and
    ``cfg``: ModelSamplingSD3's shift and KSampler's CFG (default: the toy world's). Node ids: "7" SaveLatent,
    "9" SaveAnimatedWEBP, "11" SaveImage (heat map, routed only), "15" PreviewAny (the routing summary text, routed
    only)."""
    g: dict[str, dict] = {
        "1": {"class_type": "PARELoadPrunedWan",
              "inputs": {"unet_name": STUDENT if routed else TEACHER, "weight_dtype": "default"}},
        "2": {"class_type": "PAREToyTextEncode", "inputs": {"text_encoder": TEXT, "text": prompt}},
        "3": {"class_type": "PAREToyTextEncode", "inputs": {"text_encoder": TEXT, "text": ""}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": SIZE, "height": SIZE, "length": FRAMES, "batch_size": 1}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "seed": seed, "steps": STEPS, "cfg": cfg, "sampler_name": SAMPLER,
                         "scheduler": SCHEDULER, "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"{prefix}_latent"}},
    }
    if routed:
        g["12"] = {"class_type": "PARELoadRouter", "inputs": {"router_name": ROUTER}}
        apply = {**(router_knobs or {}), "model": ["1", 0], "router": ["12", 0]}
        g["13"] = {"class_type": "PAREApplyRouter", "inputs": apply}
        g["5"]["inputs"]["model"] = ["13", 0]
        g["10"] = {"class_type": "PARERoutingReport", "inputs": {"model": ["5", 0], "samples": ["6", 0]}}
        g["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": f"{prefix}_routing"}}
        g["15"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    if decode:
        g["14"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE}}
        g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["14", 0]}}
        g["9"] = {"class_type": "SaveAnimatedWEBP",
                  "inputs": {"images": ["8", 0], "filename_prefix": prefix, "fps": 8.0, "lossless": True,
                             "quality": 100, "method": "fastest"}}
    return g


def block_compute_ratio(summary: str, diffusion_models: Path) -> float:
    """Student's executed block compute per step / the teacher's: PARE Routing Report's executed fraction of the
    student's block compute, times the student's total block compute over the teacher's (compute.py's MACs)."""
    m = re.search(r"block compute executed: ([0-9.]+)%", summary)
    if m is None:
        raise RuntimeError(f"no executed fraction in the routing summary:\n{summary}")
    tokens = tokens_for(FRAMES, SIZE, SIZE)
    macs = [sum(b.total for b in model_block_macs(read_meta(diffusion_models / name)[0], tokens, TEXT_TOKENS))
            for name in (STUDENT, TEACHER)]
    return float(m.group(1)) / 100.0 * macs[0] / macs[1]


def routing_summary(entry: dict) -> str:
    """The routing report's summary text from a routed run's history entry."""
    return entry["outputs"]["15"]["text"][0]
