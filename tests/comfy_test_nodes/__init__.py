"""Test-only ComfyUI nodes (never shipped): count how often each Wan block really executes; load stored
conditioning for the tiny models (conditioning.py).

PARETestCountBlocks object-patches every block's ``forward`` with a counter, so the count is taken inside
the block itself, independently of PARE's own bookkeeping. PARETestReadCounts returns the counts as JSON
(after sampling, because it takes the sampled LATENT). PARETestLoadUnpadded loads a Wan file the way PARE Load
Pruned Wan did before tensor-core padding (the reference of the padding test); PARETestModelWidths reports the
per-block widths of the model ComfyUI runs.
"""

from __future__ import annotations

from collections import defaultdict

from comfy_api.latest import ComfyExtension, io

from .conditioning import PARELoadConditioning
from .pack_internals import PARETestLoadUnpadded, PARETestModelWidths
from .read_out import read_out_node
from .ti2v import PARETestReadGrids, PARETestTI2VLatent, PARETestTokenGrid

COUNTS: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))


class _Counting:
    def __init__(self, tag: str, index: int, forward):
        self.tag, self.index, self.forward = tag, index, forward

    def __call__(self, *args, **kwargs):
        COUNTS[self.tag][self.index] += 1
        return self.forward(*args, **kwargs)


class PARETestCountBlocks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestCountBlocks", category="testing", inputs=[
            io.Model.Input("model"), io.String.Input("tag")], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, tag):
        m = model.clone()
        COUNTS.pop(tag, None)
        for i, block in enumerate(m.get_model_object("diffusion_model").blocks):
            m.add_object_patch(f"diffusion_model.blocks.{i}.forward", _Counting(tag, i, block.forward))
        return io.NodeOutput(m)


PARETestReadCounts = read_out_node(
    "PARETestReadCounts", lambda tag: {str(k): v for k, v in sorted(COUNTS.get(tag, {}).items())})


class _Offset:
    """A persistent double_block patch from 'another pack': run the block, then add a constant."""

    def __init__(self, offset: float):
        self.offset = offset

    def __call__(self, args, extra):
        return {"img": extra["original_block"](args)["img"] + self.offset}


class PARETestOffsetBlock(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestOffsetBlock", category="testing", inputs=[
            io.Model.Input("model"), io.Int.Input("block"), io.Float.Input("offset")], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, block, offset):
        m = model.clone()
        m.set_model_patch_replace(_Offset(offset), "dit", "double_block", block)
        return io.NodeOutput(m)


class _PlainBlocks:
    """A forward_orig that runs every block directly, ignoring block patches (as a pack replacing the forward
    would): the blocks' own forward, with the same arguments ComfyUI's Wan passes."""

    def __init__(self, model):
        self.model = model
        self.forward_orig = type(model).forward_orig

    def __call__(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):  # noqa: B006
        options = {k: v for k, v in transformer_options.items() if k != "patches_replace"}
        return self.forward_orig(self.model, x, t, context, clip_fea=clip_fea, freqs=freqs,
                                 transformer_options=options, **kwargs)


class PARETestBypassBlockPatches(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestBypassBlockPatches", category="testing", inputs=[io.Model.Input("model")],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model):
        m = model.clone()
        m.add_object_patch("diffusion_model.forward_orig", _PlainBlocks(m.get_model_object("diffusion_model")))
        return io.NodeOutput(m)


class _Ext(ComfyExtension):
    async def get_node_list(self):
        return [PARETestCountBlocks, PARETestReadCounts, PARETestOffsetBlock, PARELoadConditioning, PARETestTI2VLatent,
                PARETestTokenGrid, PARETestReadGrids,
                PARETestBypassBlockPatches, PARETestLoadUnpadded, PARETestModelWidths]


async def comfy_entrypoint():
    return _Ext()
