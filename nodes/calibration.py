"""PARE Save Calibration Sample: one calibration sample per prompt, for ``python -m training calibrate``.

Takes the conditioning a real graph produces (ComfyUI's own umT5 encode; for I2V the output of
WanImageToVideo, whose CLIP vision features are kept) and optionally a clean latent, and writes
``comfyui_pare.calibration`` files into ComfyUI's output folder under a subfolder, atomically. A latent batch of
B writes B samples (seed, seed + 1, ...), all with the same prompt.
"""

from __future__ import annotations

import logging
import os

from ..comfyui_pare.calibration import LATENT_CHANNELS, write_sample
from ..comfyui_pare.errors import PareFormatError
from ..comfyui_pare.model_family import FAMILIES
from .comfy_compat import internals, io, require

logger = logging.getLogger(__name__)


def latent_shape_for(width: int, height: int, length: int) -> list[int]:
    """The Wan2.1 latent shape [16, T, H, W] of a video of this size (as EmptyHunyuanLatentVideo makes it); a
    Wan2.2 5B sample comes with its latent connected."""
    return list(FAMILIES["wan2.1-t2v"].latent_shape(length, height, width))


def _conditioning_tensors(conditioning: list) -> tuple:
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        n = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise PareFormatError(f"PARE Save Calibration Sample: 'conditioning' must hold exactly one entry (one text "
                              f"encode), got {n}; save combined prompts one by one")
    context, extra = conditioning[0]
    if context.ndim != 3 or context.shape[0] != 1:
        raise PareFormatError(f"PARE Save Calibration Sample: 'conditioning' tensor has shape {list(context.shape)}, "
                              "expected [1, L, text_dim] (one prompt)")
    clip = extra.get("clip_vision_output")
    clip_fea = None
    if clip is not None:
        clip_fea = clip.penultimate_hidden_states
        clip_fea = clip_fea[0] if clip_fea.ndim == 3 else clip_fea
    return context[0], clip_fea


class PARESaveCalibrationSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARESaveCalibrationSample",
            display_name="PARE Save Calibration Sample",
            category="PARE/training",
            description=(
                "Saves one calibration sample (text conditioning, optional CLIP vision features and clean latent) "
                "as a .safetensors file in the output folder, for `python -m training calibrate`: calibrate and "
                "distil PARE students on your own prompts."
            ),
            is_output_node=True,
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The positive conditioning of one prompt (CLIP Text "
                                      "Encode with the umT5 text encoder; for I2V, WanImageToVideo's positive)."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt text, stored in the sample's metadata for reference."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Noise seed stored with the sample: calibration noises the latent with it."),
                io.Int.Input("width", default=832, min=16, max=8192, step=16,
                             tooltip="Video width in pixels (used for the latent shape when no latent is connected)."),
                io.Int.Input("height", default=480, min=16, max=8192, step=16,
                             tooltip="Video height in pixels (used when no latent is connected)."),
                io.Int.Input("length", default=81, min=1, max=8192, step=4,
                             tooltip="Number of frames (used when no latent is connected)."),
                io.String.Input("subfolder", default="pare_calibration",
                                tooltip="Subfolder of ComfyUI's output folder to write the samples to."),
                io.String.Input("filename_prefix", default="sample", tooltip="File name prefix of the samples."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional clean latent of the video (e.g. VAE Encode of a real clip, or a "
                                        "finished sampling). Without one, training can generate it with the teacher."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, conditioning, prompt: str, seed: int, width: int, height: int, length: int, subfolder: str,
                filename_prefix: str, latent=None) -> io.NodeOutput:
        require("PARE Save Calibration Sample")
        context, clip_fea = _conditioning_tensors(conditioning)
        if latent is not None:
            samples = latent["samples"]
            if samples.ndim != 5 or samples.shape[1] not in LATENT_CHANNELS:
                raise PareFormatError(f"PARE Save Calibration Sample: 'latent' has shape {list(samples.shape)}, "
                                      f"expected [B, C, T, H, W] with C one of {sorted(LATENT_CHANNELS)} (a Wan2.1 "
                                      "or Wan2.2 5B video latent)")
            rows = [samples[i] for i in range(samples.shape[0])]
            shape = list(samples.shape[1:])
        else:
            rows, shape = [None], latent_shape_for(width, height, length)
        out_root = internals.output_directory()
        if os.path.isabs(subfolder) or ".." in subfolder.replace("\\", "/").split("/"):
            raise PareFormatError(f"PARE Save Calibration Sample: 'subfolder' {subfolder!r} must stay inside the "
                                  "output folder")
        folder, name, counter, sub, _ = internals.save_image_path(os.path.join(subfolder, filename_prefix), out_root)
        results = []
        for i, row in enumerate(rows):
            file = f"{name}_{counter + i:05}_.safetensors"
            write_sample(os.path.join(folder, file), context, latent_shape=shape, seed=seed + i, prompt=prompt,
                         clip_fea=clip_fea, latent=row)
            results.append({"filename": file, "subfolder": sub, "type": "output"})
        logger.info("PARE: wrote %d calibration sample(s) to %s", len(results), folder)
        return io.NodeOutput(ui={"calibration_samples": results})
