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

from .read_out import read_out_node


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


GRIDS: dict[str, list] = {}


class PARETestTokenGrid(io.ComfyNode):
    """Records the token grid of every model call (the pack's hook kit's CallInfo) and the tokens block 0 receives."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestTokenGrid", category="testing", inputs=[
            io.Model.Input("model"), io.String.Input("tag")], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, tag):
        from comfy import patcher_extension as pe

        from .pack_internals import pack_module

        call_info = pack_module("nodes.hooks").CallInfo
        GRIDS[tag] = []

        def wrapper(executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
            info = call_info.read(executor.class_obj, x, timestep, context, transformer_options)
            GRIDS[tag].append({"grid": list(info.grid), "timestep": list(timestep.shape)})
            return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

        def block0(args, extra):
            GRIDS[tag].append({"block0_tokens": args["img"].shape[1]})
            return extra["original_block"](args)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, f"grid_{tag}", wrapper)
        m.set_model_patch_replace(block0, "dit", "double_block", 0)
        return io.NodeOutput(m)


PARETestReadGrids = read_out_node("PARETestReadGrids", lambda tag: GRIDS.get(tag, []))
