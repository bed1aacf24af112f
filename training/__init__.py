"""PARE's producer toolkit: calibrate, prune, distil, route and export Wan2.1 students (run as ``python -m training``).

Not part of the node archive (`.comfyignore`): the node pack ships only ``comfyui_pare/`` and ``nodes/``.
"""
