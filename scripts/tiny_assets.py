"""The project's tiny stand-ins for Wan2.1 assets, built deterministically in seconds and cached.

- tiny Wan2.1 teachers (T2V, I2V) in the original key layout, with PARE metadata (head dim 32);
- a tiny Wan2.1 VAE (base dim 8) with ComfyUI's real VAE architecture;
- conditioning tensors (the umT5-XXL text encoder cannot be shrunk, so embeddings are stored as tensors).

Run as `python -m scripts.tiny_assets DEST_DIR` to write them; `ensure_assets()` caches them under PARE_CACHE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from comfy_library import import_comfy
from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from training.tiny import TINY_I2V, TINY_T2V, random_wan_state_dict

REPO = Path(__file__).resolve().parents[1]

ASSET_VERSION = "1"
CACHE = Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "comfyui-pare"))

TEACHER_T2V = "pare_tiny_t2v_teacher.safetensors"
TEACHER_I2V = "pare_tiny_i2v_teacher.safetensors"
VAE = "pare_tiny_wan21_vae.safetensors"
POSITIVE = "pare_tiny_positive.safetensors"
NEGATIVE = "pare_tiny_negative.safetensors"
CONTEXT_TOKENS = 16


def write_teachers(dest: Path) -> None:
    for name, dims, seed in ((TEACHER_T2V, TINY_T2V, 0), (TEACHER_I2V, TINY_I2V, 1)):
        save_checkpoint(dest / name, random_wan_state_dict(dims, seed=seed), PrunedWanMeta.teacher(dims))


def write_conditioning(dest: Path) -> None:
    gen = torch.Generator().manual_seed(1234)
    for name in (POSITIVE, NEGATIVE):
        tensors = {
            "context": torch.randn(CONTEXT_TOKENS, TINY_T2V.text_dim, generator=gen),
            "clip_fea": torch.randn(257, 1280, generator=gen),
        }
        save_atomic(dest / name, tensors, {"format": "pt"})


def write_vae(dest: Path) -> None:
    """ComfyUI's own Wan2.1 VAE class at base dim 8, with deterministic random weights."""
    import_comfy("cpu")
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for key, t in vae.state_dict().items():
        if key.endswith("gamma"):
            sd[key] = torch.ones_like(t)
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            sd[key] = torch.randn(t.shape, generator=gen) / fan_in**0.5
        else:
            sd[key] = torch.zeros_like(t)
    save_atomic(dest / VAE, sd, {"format": "pt"})


def ensure_assets() -> Path:
    """Build the tiny assets once (cached by ASSET_VERSION) and return their folder."""
    folder = CACHE / f"tiny-assets-v{ASSET_VERSION}"
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_teachers(tmp)
    write_conditioning(tmp)
    # The VAE needs ComfyUI's modules; build it in a child process so callers stay free of them.
    subprocess.run([sys.executable, "-m", "scripts.tiny_assets", "--vae-only", str(tmp)], check=True, cwd=REPO)
    (tmp / ".complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def install_assets(base: Path) -> None:
    """Link the tiny assets into a ComfyUI base directory (models/diffusion_models, models/vae, input)."""
    src = ensure_assets()
    places = {TEACHER_T2V: "models/diffusion_models", TEACHER_I2V: "models/diffusion_models",
              VAE: "models/vae", POSITIVE: "input", NEGATIVE: "input"}
    for name, sub in places.items():
        target = base / sub / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(src / name, target)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--vae-only":
        write_vae(Path(sys.argv[2]))
    elif len(sys.argv) == 2:
        dest = Path(sys.argv[1])
        dest.mkdir(parents=True, exist_ok=True)
        src = ensure_assets()
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copyfile(f, dest / f.name)
    else:
        sys.exit("usage: python -m scripts.tiny_assets DEST_DIR")
