"""Test-only nodes that reach into the loaded pack: the unpadded reference loader and a width probe."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import folder_paths
from comfy_api.latest import io

_ROOT = Path(__file__).resolve().parents[2]  # the checkout ComfyUI loaded as the pack


def pack_module(sub: str) -> ModuleType:
    """A submodule of the pack as ComfyUI imported it (its package name is the custom_nodes path)."""
    for name, module in list(sys.modules.items()):
        f = getattr(module, "__file__", None)
        if f and getattr(module, "__path__", None) and Path(f).resolve() == _ROOT / "__init__.py":
            return importlib.import_module(f"{name}.{sub}")
    raise RuntimeError(f"the pack at {_ROOT} is not loaded")


class PARETestLoadUnpadded(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestLoadUnpadded", category="testing", inputs=[io.String.Input("unet_name")],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, unet_name):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        with pack_module("comfyui_pare.wan_reader").open_wan(path) as reader:
            sd, meta = reader.state_dict(dequantize=False), reader.meta
        patcher = pack_module("nodes.wan_model").build_wan_patcher(sd, meta, {}, source=path)
        pack_module("nodes.model_info").attach_meta(patcher, meta)
        return io.NodeOutput(patcher)


class PARETestModelWidths(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PARETestModelWidths", category="testing", is_output_node=True,
                         inputs=[io.Model.Input("model")], outputs=[io.String.Output()], not_idempotent=True)

    @classmethod
    def execute(cls, model):
        blocks = model.get_model_object("diffusion_model").blocks
        widths = [{"self_attention": b.self_attn.q.weight.shape[0], "heads": b.self_attn.num_heads,
                   "ffn": b.ffn[0].weight.shape[0]} for b in blocks]
        text = json.dumps(widths)
        return io.NodeOutput(text, ui={"text": [text]})
