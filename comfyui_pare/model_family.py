"""One spec per Wan model family: every fact that differs between the Wan variants, in this file only.

A family (finetrainers' one-``ModelSpecification``-per-model habit) says what its transformer and latents look
like: the patch size, the VAE's stride and latent channels with their per-channel statistics, the modules it
carries beyond the main blocks, whether ComfyUI hands it one timestep per sample or one per latent frame, and the
name ComfyUI's detection gives it (``comfy/supported_models.py``). Compute accounting, the checkpoint format, the
reader, the nodes and the training toolkit ask the family instead of keeping constants; adding a variant that
reuses Wan blocks is one entry here plus its tests.

Families the pack cannot prune or route yet are listed too, with what is missing, so a file of theirs is refused
by name instead of failing somewhere inside a load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

PATCH_SIZE = (1, 2, 2)  # (frames, rows, columns) of one token, the same for every Wan

# Per-channel statistics of the VAE latents, copied from ComfyUI's comfy/latent_formats.py (classes Wan21 and
# Wan22, latents_mean / latents_std; the same numbers as the Wan VAEs' own configs). Architecture constants.
_WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
_WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
_WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
_WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class LatentSpace:
    """A Wan VAE's latent space: how far it downsamples and the statistics ComfyUI's latent format applies."""

    name: str  # ComfyUI's latent format class ("Wan21", "Wan22")
    channels: int
    vae_stride: tuple[int, int, int]  # (frames after the first, height, width) pixels per latent element
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"latent space {self.name}: {self.channels} channels but {len(self.mean)} means and "
                             f"{len(self.std)} stds")

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(latent frames, rows, columns) of a video, as ComfyUI's Wan latent nodes make it: the first frame is
        its own latent frame, every ``stride`` frames after it one more; height and width are floored."""
        t, h, w = self.vae_stride
        return (frames - 1) // t + 1, height // h, width // w


WAN21_LATENT = LatentSpace("Wan21", 16, (4, 8, 8), _WAN21_MEAN, _WAN21_STD)
WAN22_LATENT = LatentSpace("Wan22", 48, (4, 16, 16), _WAN22_MEAN, _WAN22_STD)

# Extra modules, by the key prefix of their parameters in the original layout.
IMG_EMB = "img_emb."  # CLIP image projection (I2V): a full-width part of every I2V Wan, kept as the teacher's
VACE = ("vace_patch_embedding.", "vace_blocks.")
CAMERA = ("control_adapter.",)


@dataclass(frozen=True)
class WanFamily:
    """Everything variant-specific about one Wan model family."""

    name: str  # stored in a pruned file's metadata ("family")
    title: str  # what messages and node texts call it
    comfy_class: str  # ComfyUI's supported_models class its detection picks
    model_type: str  # ComfyUI's detected ``model_type``
    cross_attn: str  # the blocks' cross-attention: "t2v" (text) or "i2v" (text + CLIP image); WanDims.variant
    latent: LatentSpace
    in_dim: int  # channels into patch_embedding (latent + any conditioning concatenated to it)
    extra_modules: tuple[str, ...] = ()  # key prefixes beyond the main blocks, embeddings and head
    timestep: str = "per_sample"  # "per_frame": ComfyUI passes [rows, latent frames] (clean first frame at 0)
    patch_size: tuple[int, int, int] = PATCH_SIZE
    missing: str = ""  # non-empty: refused, and this says what the pack lacks for it

    @property
    def supported(self) -> bool:
        return not self.missing

    @property
    def out_dim(self) -> int:
        return self.latent.channels

    @property
    def patch_volume(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    def tokens_for(self, frames: int, height: int, width: int) -> int:
        """Video tokens the transformer sees for a ``frames`` x ``height`` x ``width`` (pixels) generation; odd
        latent sizes are rounded up, as ComfyUI pads the latent to the patch."""
        for what, v in (("frames", frames), ("height", height), ("width", width)):
            if int(v) < 1:
                raise ValueError(f"{what} must be positive, got {v}")
        latent = self.latent.latent_size(frames, height, width)
        if min(latent) < 1:
            _, h, w = self.latent.vae_stride
            raise ValueError(f"{width}x{height} is smaller than one latent pixel ({w}x{h}, the {self.latent.name} VAE)")
        t, h, w = token_grid(latent, self.patch_size)
        return t * h * w

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[channels, T, H, W] of the latent of such a video."""
        return (self.latent.channels, *self.latent.latent_size(frames, height, width))


def token_grid(latent_thw: tuple[int, ...], patch_size: tuple[int, int, int] = PATCH_SIZE) -> tuple[int, int, int]:
    """Tokens per (frame, row, column) after patch embedding of a [T, H, W] latent (padded up to the patch)."""
    return tuple(-(-int(n) // p) for n, p in zip(latent_thw, patch_size, strict=True))  # type: ignore[return-value]


_REFUSED_BLOCKS = "its extra modules are not carried through pruning, the loader and the tests yet"
FAMILIES: dict[str, WanFamily] = {f.name: f for f in (
    # Wan2.2-A14B's experts have Wan2.1 14B's layout and latents: one family each, titled for both.
    WanFamily("wan2.1-t2v", "Wan2.1 / Wan2.2-A14B T2V", "WAN21_T2V", "t2v", "t2v", WAN21_LATENT, 16),
    WanFamily("wan2.1-i2v", "Wan2.1 / Wan2.2-A14B I2V", "WAN21_I2V", "i2v", "i2v", WAN21_LATENT, 36, (IMG_EMB,)),
    # Wan2.1 Fun-Control / Fun-InP: an I2V with the control video concatenated (16 + 16 + 16 channels).
    WanFamily("wan2.1-fun-control", "Wan2.1 Fun-Control", "WAN21_FunControl2V", "i2v", "i2v", WAN21_LATENT, 48,
              (IMG_EMB,)),
    # Wan2.2 TI2V-5B: a T2V whose latents are the 16x Wan2.2 VAE's 48 channels; with a start image
    # (Wan22ImageToVideoLatent) ComfyUI's WAN22 passes one timestep per latent frame, 0 for the clean first frame.
    WanFamily("wan2.2-ti2v-5b", "Wan2.2 TI2V-5B", "WAN22_T2V", "t2v", "t2v", WAN22_LATENT, 48,
              timestep="per_frame"),
    # VACE: main blocks plus VACE blocks whose hints are added after main blocks 0, k, 2k, ... (k = layers /
    # vace layers). The hints are computed from the VACE stream and added outside the main block, so a skipped main
    # block still gets its hint, as in the stock forward.
    WanFamily("wan2.1-vace", "Wan2.1 VACE", "WAN21_Vace", "vace", "t2v", WAN21_LATENT, 16, VACE),
    WanFamily("wan2.1-camera", "Wan2.1 Fun-Camera", "WAN21_Camera", "camera", "i2v", WAN21_LATENT, 32,
              (IMG_EMB, *CAMERA), missing=f"the camera control_adapter: {_REFUSED_BLOCKS}"),
    WanFamily("wan2.2-camera", "Wan2.2 Fun-Camera", "WAN22_Camera", "camera_2.2", "t2v", WAN21_LATENT, 36, CAMERA,
              missing=f"the camera control_adapter: {_REFUSED_BLOCKS}"),
    WanFamily("wan2.2-s2v", "Wan2.2 S2V", "WAN22_S2V", "s2v", "t2v", WAN21_LATENT, 16, ("casual_audio_encoder.",),
              missing="the audio encoder and the audio-injected blocks (WanS2VModel replaces the main blocks)"),
    WanFamily("wan2.1-humo", "Wan2.1 HuMo", "WAN21_HuMo", "humo", "t2v", WAN21_LATENT, 16, ("audio_proj.",),
              missing="the audio projection and the audio cross-attention in every block (HuMo's own block class)"),
    WanFamily("wan2.2-animate", "Wan2.2 Animate", "WAN22_Animate", "animate", "i2v", WAN21_LATENT, 36,
              ("face_adapter.", "motion_encoder.", "pose_patch_embedding."),
              missing="the face adapter and motion encoder (face blocks fused after main blocks)"),
)}

# Keys whose presence marks a family ComfyUI detects by key (comfy/model_detection.py, Wan branch), in its order.
_DETECT_BY_KEY = (
    ("vace_patch_embedding.weight", "wan2.1-vace"),
    ("control_adapter.conv.weight", None),  # camera: 2.1 with img_emb, else 2.2
    ("casual_audio_encoder.encoder.final_linear.weight", "wan2.2-s2v"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "wan2.1-humo"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "wan2.2-animate"),
)
_COMFY_ONLY = {  # detected by ComfyUI, unknown to the pack: refused with ComfyUI's name
    "patch_embedding_mask.weight": "SCAIL2", "patch_embedding_pose.weight": "SCAIL",
    "patch_embedding_global.weight": "WanDancer",
}


class UnsupportedFamily(ValueError):
    """A Wan variant the pack knows by name but cannot prune or route (yet); the message says what is missing."""


def family(name: str) -> WanFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown Wan model family {name!r}; known: {', '.join(FAMILIES)}") from None


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> WanFamily:
    """The family of a Wan state dict (original keys, no prefix) from its keys and shapes, as ComfyUI's detection
    tells them apart; refused families come back too (check ``supported``)."""
    for key, name in _DETECT_BY_KEY:
        if key in shapes:
            if name is None:
                name = "wan2.1-camera" if f"{IMG_EMB}proj.0.bias" in shapes else "wan2.2-camera"
            return FAMILIES[name]
    for key, comfy_name in _COMFY_ONLY.items():
        if key in shapes:
            raise UnsupportedFamily(f"a Wan {comfy_name} model ('{key}'): comfyui-pare does not know this variant")
    in_dim = shapes.get("patch_embedding.weight", (0, 16))[1]
    out_dim = shapes.get("head.head.weight", (16 * 4,))[0] // PATCH_SIZE[1] // PATCH_SIZE[2]
    return family_for(in_dim, out_dim, i2v=f"{IMG_EMB}proj.0.bias" in shapes)


def family_for(in_dim: int, out_dim: int, i2v: bool, vace: bool = False) -> WanFamily:
    """The supported family of a main-block Wan with these channels (older PARE files name none: inferred)."""
    if vace:
        return FAMILIES["wan2.1-vace"]
    if out_dim == WAN22_LATENT.channels and not i2v:
        return FAMILIES["wan2.2-ti2v-5b"]
    if i2v:
        return FAMILIES["wan2.1-fun-control" if in_dim == 48 else "wan2.1-i2v"]
    return FAMILIES["wan2.1-t2v"]


def family_from_comfy(model_type: str, in_dim: int, out_dim: int) -> WanFamily:
    """The family of a model ComfyUI detected as Wan with this ``model_type`` (its unet_config), refused ones too."""
    if model_type in ("t2v", "i2v"):
        return family_for(in_dim, out_dim, i2v=model_type == "i2v")
    for fam in FAMILIES.values():
        if fam.model_type == model_type:
            return fam
    raise UnsupportedFamily(f"a Wan model ComfyUI detects as model_type {model_type!r}: comfyui-pare does not know "
                            "this variant")


def require_supported(fam: WanFamily, source: str) -> WanFamily:
    if not fam.supported:
        raise UnsupportedFamily(f"{source}: a {fam.title} model (ComfyUI {fam.comfy_class}); comfyui-pare cannot "
                                f"prune or route it: missing {fam.missing}. Supported: "
                                f"{', '.join(f.title for f in FAMILIES.values() if f.supported)}")
    return fam
