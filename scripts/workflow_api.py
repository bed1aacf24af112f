"""Turn a workflow in ComfyUI's UI format (what the front end saves: nodes, links, positions) into the API format
that POST /prompt takes, the way the front end's graphToPrompt does it.

The shipped workflows exist only in the UI format; tests and the demo generate API graphs from them with this,
using the running server's /object_info for each node's inputs. The browser test checks the result against the real
front end's own graphToPrompt.

Mapping (ComfyUI front end 1.32): ``widgets_values`` holds one value per widget, in the order of the node
definition's inputs that are widgets (INT, FLOAT, STRING, BOOLEAN, combos); an input declared with
``control_after_generate`` is followed by one extra value (fixed/increment/randomize), and an ``image_upload``
input by the upload button's value. A widget input that is connected takes the link instead of its value.
A workflow saved before a node gained an input has fewer values than the node now has widgets: the front end
(1.32 to 1.49, ``LGraphNode.configure``) assigns the saved values to the widgets in order and leaves every widget
past the end of the list at the value it was created with: the input's default, else a combo's first option (e.g.
``CreateVideo``'s ``bit_depth``, added in 0.3x: 8). The converter does the same; a missing value for another input
is an error. A dynamic combo (0.3x's V3 ``DynamicCombo``, e.g. ``SaveVideo``'s ``format``) is followed by the widgets
of its chosen option, sent as ``format.codec``; an input marked ``hidden`` still has a (hidden) widget, which holds
a value and is sent (1.49.6 sends SaveVideo's legacy ``codec`` at its first option).
Notes and other front-end-only nodes are dropped; muted (mode 2) and bypassed (mode 4) nodes are refused here,
because the shipped workflows use neither.
"""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a combo whose chosen option adds inputs (0.3x's SaveVideo format/codec)
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowError(ValueError):
    """A UI workflow that cannot be turned into an API graph (unknown node, bad link, missing value)."""


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO


def _extra_values(spec: list) -> int:
    opts = _options(spec)
    return int(bool(opts.get("control_after_generate"))) + sum(1 for f in UPLOAD_FLAGS if opts.get(f))


def _default(spec: list) -> Any:
    """The value a widget is created with: the input's default, else a combo's first option (KeyError: neither)."""
    opts = _options(spec)
    if "default" in opts:
        return opts["default"]
    choices = spec[0] if isinstance(spec[0], list) else opts.get("options")
    if spec[0] in ("COMBO", DYNAMIC_COMBO) or isinstance(spec[0], list):
        if choices:
            first = choices[0]
            return first["key"] if isinstance(first, dict) else first
    raise KeyError("default")


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    spec, order = info["input"], info.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        names = order.get(section) or list(spec.get(section, {}))
        out += [(name, spec[section][name]) for name in names]
    return out


def _fill_widgets(inputs: dict[str, Any], specs: list[tuple[str, list]], values: list, pos: int, prefix: str,
                  where: str) -> int:
    """Give each widget input of ``specs`` its saved value (or its default past the end of ``values``); returns the
    position of the next value. A dynamic combo's chosen option brings its own inputs, named ``combo.input``, right
    after the combo's value, as the front end adds their widgets after the combo's."""
    for name, spec in specs:
        if not _is_widget(spec):
            continue
        key = prefix + name
        if pos < len(values):
            value = values[pos]
        else:
            try:
                value = _default(spec)
            except KeyError:
                raise WorkflowError(f"{where}: no widget value for '{key}' ({len(values)} values) and the input has "
                                    "no default") from None
        inputs[key] = value
        pos += 1 + _extra_values(spec)
        if spec[0] == DYNAMIC_COMBO:
            option = next((o for o in _options(spec).get("options", []) if o.get("key") == value), None)
            if option is None:
                raise WorkflowError(f"{where}: '{key}' is {value!r}, not one of its options")
            sub = [(n, sp) for section in ("required", "optional")
                   for n, sp in option.get("inputs", {}).get(section, {}).items()]
            pos = _fill_widgets(inputs, sub, values, pos, key + ".", where)
    return pos


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
        inputs: dict[str, Any] = {}
        _fill_widgets(inputs, _ordered_inputs(object_info[ntype]), list(node.get("widgets_values") or []), 0, "",
                      where)
        inputs.update(linked)
        api[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                "_meta": {"title": node.get("title") or object_info[ntype]["display_name"]}}
    return api
