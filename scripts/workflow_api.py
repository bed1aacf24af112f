"""Turn a workflow in ComfyUI's UI format (what the front end saves: nodes, links, positions) into the API format
that POST /prompt takes, the way the front end's graphToPrompt does it.

The shipped workflows exist only in the UI format; tests and the demo generate API graphs from them with this,
using the running server's /object_info for each node's inputs. The browser test checks the result against the real
front end's own graphToPrompt.

Mapping (ComfyUI front end 1.32): ``widgets_values`` holds one value per widget, in the order of the node
definition's inputs that are widgets (INT, FLOAT, STRING, BOOLEAN, combos); an input declared with
``control_after_generate`` is followed by one extra value (fixed/increment/randomize), and an ``image_upload``
input by the upload button's value. A widget input that is connected takes the link instead of its value.
Notes and other front-end-only nodes are dropped; muted (mode 2) and bypassed (mode 4) nodes are refused here,
because the shipped workflows use neither.
"""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowError(ValueError):
    """A UI workflow that cannot be turned into an API graph (unknown node, bad link, missing value)."""


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values(spec: list) -> int:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return int(bool(opts.get("control_after_generate"))) + sum(1 for f in UPLOAD_FLAGS if opts.get(f))


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    spec, order = info["input"], info.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        names = order.get(section) or list(spec.get(section, {}))
        out += [(name, spec[section][name]) for name in names]
    return out


def ui_to_api(workflow: dict, object_info: dict[str, Any], source: str = "workflow") -> dict[str, dict]:
    """The API graph of a UI workflow; ``object_info`` is the server's /object_info."""
    links = {link[0]: link for link in workflow.get("links", [])}
    api: dict[str, dict] = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY:
            continue
        where = f"{source}: node {node['id']} ({ntype})"
        if ntype not in object_info:
            raise WorkflowError(f"{where}: the server has no such node; is its pack installed?")
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"{where}: muted or bypassed nodes are not supported (mode {node['mode']})")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links.get(inp["link"])
                if link is None:
                    raise WorkflowError(f"{where}: input '{inp['name']}' uses link {inp['link']}, which is not in links")
                linked[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        pos = 0
        for name, spec in _ordered_inputs(object_info[ntype]):
            if _is_widget(spec):
                if pos >= len(values):
                    raise WorkflowError(f"{where}: no widget value for '{name}' ({len(values)} values)")
                inputs[name] = values[pos]
                pos += 1 + _extra_values(spec)
            if name in linked:
                inputs[name] = linked[name]
        api[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                "_meta": {"title": node.get("title") or object_info[ntype]["display_name"]}}
    return api
