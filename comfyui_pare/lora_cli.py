"""CLI verb ``lora-slice``: cut a teacher LoRA to a pruned student's widths, in the layout stock ComfyUI loads."""

from __future__ import annotations

import argparse
import json
import logging
import os

from .alignment import loaded_meta, pad_lora, unscalable_blocks
from .errors import PareError
from .lora import check_lora_base, load_lora_file, slice_lora, to_standard_state_dict
from .safetensors_io import save_atomic
from .wan_reader import open_wan

logger = logging.getLogger(__name__)

METADATA_KEY = "pare_lora"  # header entry naming the architecture a sliced LoRA fits
_SHOW_UNMATCHED = 3


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(b) and os.path.exists(a) and os.path.samefile(a, b)


def run_lora_slice(args: argparse.Namespace) -> int:
    for other in (args.lora, *([args.model] if os.path.isfile(args.model) else [])):
        if _same_file(args.out, other):
            raise PareError(f"--out {args.out} is the same file as an input ({other}); write to a new file")
    with open_wan(args.model) as reader:  # headers (and fp8 scales) only: the weights are never loaded
        meta = reader.meta
        keep_heads = unscalable_blocks(meta.num_blocks, reader.dtype, lambda k: reader.scale(k) is not None)
    parsed = load_lora_file(args.lora)
    check_lora_base(parsed, meta.dims, args.lora)
    if parsed.unmatched:
        shown = ", ".join(f"'{k}'" for k in parsed.unmatched[:_SHOW_UNMATCHED])
        more = ", ..." if len(parsed.unmatched) > _SHOW_UNMATCHED else ""
        logger.warning("%s: %d key(s) match no Wan module and are left out: %s%s",
                       args.lora, len(parsed.unmatched), shown, more)
    # Cut to the student's widths, then zero-padded like the weights PARE Load Pruned Wan pads to the tensor-core
    # grain, so the stock LoRA loader finds every shape it patches.
    sliced = pad_lora(slice_lora(parsed, meta), meta, loaded_meta(meta, keep_heads).expected_shapes())
    narrowed = sliced.narrowed
    header = {"format": "pt", METADATA_KEY: json.dumps(
        {"sliced_for": meta.fingerprint(), "source": os.path.basename(args.lora)}, separators=(",", ":"))}
    sd = to_standard_state_dict(sliced)
    save_atomic(args.out, sd, header)
    logger.info("wrote %s: %d module patch(es), %d narrowed to the kept heads / FFN neurons, %d tensor(s)",
                args.out, len(sliced.patches), narrowed, len(sd))
    return 0


def add_lora_slice_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "lora-slice",
        help="slice a LoRA trained on the full Wan2.1 teacher to a pruned student's kept heads / FFN neurons",
    )
    p.add_argument("--model", required=True, help="the pruned student (only its header is read), or any Wan2.1 checkpoint the reader knows")
    p.add_argument("--lora", required=True, help="LoRA safetensors for the teacher, in any common key style")
    p.add_argument("--out", required=True, help="output LoRA safetensors (diffusion_model.* keys, written atomically)")
    p.set_defaults(func=run_lora_slice)
    return p
