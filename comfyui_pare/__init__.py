"""comfyui_pare: the PARE core in plain torch (no ComfyUI import).

Pruned-checkpoint format, model surgery, router, LoRA slicing and compute accounting for Wan2.1.
"""

__version__ = "0.1.0"
