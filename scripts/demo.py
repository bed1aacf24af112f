"""`make demo`: render a video with a real, headless ComfyUI through the shipped tiny workflow.

1. builds the tiny Wan2.1 teacher, VAE and conditioning (cached);
2. width-prunes the teacher with `python -m comfyui_pare prune` (25% of heads and FFN neurons removed);
3. starts ComfyUI 0.3.75 with this pack, posts workflows/pare_tiny_t2v_demo.json and waits for it;
4. writes the animated WebP and a PNG strip of its frames to demo-output/.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_assets  # noqa: E402
from comfy_harness import REPO, ComfyServer  # noqa: E402

OUT = REPO / "demo-output"
WORKFLOW = REPO / "workflows" / "pare_tiny_t2v_demo.json"
STUDENT = "pare_tiny_t2v_student.safetensors"
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
    server = ComfyServer(base_dir=base)
    tiny_assets.install_assets(base)
    plan = OUT / "tiny_plan.json"
    plan.write_text(json.dumps(demo_plan()))
    dm = base / "models" / "diffusion_models"
    subprocess.run([sys.executable, "-m", "comfyui_pare", "prune", "--teacher", str(dm / tiny_assets.TEACHER_T2V),
                    "--plan", str(plan), "--out", str(dm / STUDENT)], check=True, cwd=REPO)
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
        log.info("rendered %s in %.1f s (frames: %s)", video, time.time() - t0, OUT / "pare_tiny_t2v_frames.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
