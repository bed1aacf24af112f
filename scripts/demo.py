"""`make demo`: render a video with a real, headless ComfyUI through the shipped tiny workflow.

1. builds the tiny Wan2.1 teacher, VAE and conditioning (cached);
2. width-prunes the teacher with `python -m comfyui_pare prune` (a quarter of the heads and FFN neurons of the
   middle blocks removed) and writes a hand-set router (trained routers come with the training pipeline);
3. starts ComfyUI 0.3.75 with this pack, posts workflows/pare_tiny_t2v_demo.json (pruned student, routed at a
   70% compute budget, UniPC, CFG 5) and waits for it;
4. writes the animated WebP, a PNG strip of its frames and the routing heat map to demo-output/, and prints the
   routing summary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_assets  # noqa: E402
from comfy_harness import REPO, ComfyServer  # noqa: E402

from comfyui_pare.router import BlockRouter, RouterSpec, save_router  # noqa: E402

OUT = Path(os.environ.get("PARE_DEMO_OUT", REPO / "demo-output"))
WORKFLOW = REPO / "scripts" / "tiny_demo_api.json"  # until the toy-world demo replaces it
STUDENT = "pare_tiny_t2v_student.safetensors"
ROUTER = "pare_tiny_demo_router.safetensors"
log = logging.getLogger("demo")


def demo_plan() -> dict:
    """Keep 6 of 8 heads and 384 of 512 FFN neurons in every block but the first and last."""
    dims = tiny_assets.TINY_T2V
    blocks = []
    for i in range(dims.num_layers):
        if i in (0, dims.num_layers - 1):
            blocks.append({})
        else:
            drop = {(2 * i) % dims.num_heads, (2 * i + 3) % dims.num_heads}
            blocks.append({"heads": [h for h in range(dims.num_heads) if h not in drop],
                           "ffn": list(range(0, dims.ffn_dim))[: dims.ffn_dim * 3 // 4]})
    return {"blocks": blocks}


def write_demo_router(folder: Path) -> None:
    """A hand-set router whose preferences change with the noise level: early steps favour the first half of the
    blocks, late steps the second half (the shape of the per-block contributions PARE's router learns)."""
    n = tiny_assets.TINY_T2V.num_layers
    spec = RouterSpec(num_blocks=n, dim=tiny_assets.TINY_T2V.dim)
    early = [3.0 - 1.0 * i for i in range(n)]
    late = [-2.0 + 1.0 * i for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    save_router(folder / ROUTER, BlockRouter.timestep_switch(spec, 850.0, early, late))


def frame_strip(webp: Path, png: Path, max_frames: int = 9) -> None:
    with Image.open(webp) as im:
        n = getattr(im, "n_frames", 1)
        picks = sorted({round(i * (n - 1) / max(1, max_frames - 1)) for i in range(min(n, max_frames))})
        frames = []
        for k in picks:
            im.seek(k)
            frames.append(im.convert("RGB").copy())
    w, h = frames[0].size
    strip = Image.new("RGB", (w * len(frames), h))
    for j, f in enumerate(frames):
        strip.paste(f, (j * w, 0))
    strip.save(png)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    OUT.mkdir(exist_ok=True)
    base = OUT / "comfy-base"
    # The tiny models have no text encoder: the test pack's stored-conditioning loader stands in until the toy
    # world's text encoder drives the demo.
    server = ComfyServer(base_dir=base, extra_custom_nodes=(REPO / "tests" / "comfy_test_nodes",))
    tiny_assets.install_assets(base)
    plan = OUT / "tiny_plan.json"
    plan.write_text(json.dumps(demo_plan()))
    dm = base / "models" / "diffusion_models"
    subprocess.run([sys.executable, "-m", "comfyui_pare", "prune", "--teacher", str(dm / tiny_assets.TEACHER_T2V),
                    "--plan", str(plan), "--out", str(dm / STUDENT)], check=True, cwd=REPO)
    write_demo_router(base / "models" / "pare_routers")
    log.info("starting ComfyUI (log: %s)", server.log_path)
    with server:
        t0 = time.time()
        entry = server.run(json.loads(WORKFLOW.read_text()))
        files = server.output_files(entry, "9")
        if not files:
            raise RuntimeError(f"the workflow produced no video; outputs: {entry.get('outputs')}")
        video = OUT / "pare_tiny_t2v.webp"
        shutil.copyfile(files[0], video)
        frame_strip(video, OUT / "pare_tiny_t2v_frames.png")
        shutil.copyfile(server.output_files(entry, "13")[0], OUT / "pare_tiny_routing.png")
        log.info("rendered %s in %.1f s", video, time.time() - t0)
        log.info("frames: %s; routing heat map: %s", OUT / "pare_tiny_t2v_frames.png", OUT / "pare_tiny_routing.png")
        for line in entry["outputs"]["14"]["text"][0].splitlines():
            log.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
