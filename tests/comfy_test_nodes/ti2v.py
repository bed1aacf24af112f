"""PARE Test TI2V Latent (test-only): ComfyUI's own Wan22ImageToVideoLatent with a stand-in for the Wan2.2 VAE.

The Wan2.2 VAE has a fixed width (160) in ComfyUI, so no tiny one exists. The stock node's code runs unchanged: only
``vae.encode`` is replaced by a deterministic function of the start image with the Wan2.2 VAE's output shape
([1, 48, latent frames, H / 16, W / 16]), so the LATENT (process_out applied, the first frame's noise mask at 0) is
exactly what the stock node makes of such an encoding.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io
from comfy_extras.nodes_wan import Wan22ImageToVideoLatent


class _StubWan22VAE:
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        frames, h, w = image.shape[0], image.shape[1] // 16, image.shape[2] // 16
        gen = torch.Generator().manual_seed(5)
        pattern = torch.randn(1, 48, (frames - 1) // 4 + 1, h, w, generator=gen)
        return pattern * (0.5 + image.float().mean())


class PARETestTI2VLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestTI2VLatent", category="testing", inputs=[
            io.Int.Input("width", default=64), io.Int.Input("height", default=64), io.Int.Input("length", default=9),
            io.Image.Input("start_image", optional=True)], outputs=[io.Latent.Output()])

    @classmethod
    def execute(cls, width, height, length, start_image=None):
        out = Wan22ImageToVideoLatent.execute(_StubWan22VAE(), width, height, length, 1, start_image=start_image)
        return io.NodeOutput(out[0] if isinstance(out, tuple) else out.result[0])
