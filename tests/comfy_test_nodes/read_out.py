"""The test nodes' read-out: an output node that takes the sampled LATENT (so it runs after sampling) and a tag, and
returns what a recording node stored under that tag, as JSON text."""

from __future__ import annotations

import json
from typing import Callable

from comfy_api.latest import io


def read_out_node(node_id: str, read: Callable[[str], object]) -> type[io.ComfyNode]:
    """A ComfyNode ``node_id`` whose output is ``json.dumps(read(tag))``."""

    class ReadOut(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, category="testing", is_output_node=True, inputs=[
                io.Latent.Input("samples"), io.String.Input("tag")], outputs=[io.String.Output()], not_idempotent=True)

        @classmethod
        def execute(cls, samples, tag):
            text = json.dumps(read(tag))
            return io.NodeOutput(text, ui={"text": [text]})

    ReadOut.__name__ = ReadOut.__qualname__ = node_id
    return ReadOut
