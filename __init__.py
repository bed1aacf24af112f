"""comfyui-pare: PARE (Pruning and Adaptive Routing) for Wan2.1 in ComfyUI.

The core (``comfyui_pare``) is plain torch and imports without ComfyUI; nodes register only when this
package is loaded by ComfyUI. V3 only: exporting NODE_CLASS_MAPPINGS too would make ComfyUI skip the V3 nodes.
"""

# Node help pages (web/docs/<NodeId>.md), shown by ComfyUI's front end in the node library.
WEB_DIRECTORY = "./web"

try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
