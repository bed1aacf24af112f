"""PARE Token Reduction, the node: schedule choice and checks; the runtime is nodes/token_reduction.py."""

from __future__ import annotations

import math

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.token_schedule import PRESETS, TokenSchedule, parse_schedule_text, preset
from .comfy_compat import io, require
from .folders import TOKEN_SCHEDULES, token_schedule_dir
from .hooks import check_percent_range
from .model_files import read_model_text
from .model_info import model_meta
from .token_reduction import ReductionTemplate, apply_token_reduction

ADVANCED = {"optional": True}  # expert knobs (0.3.75's V3 inputs have no advanced= flag yet)


# -- the node -----------------------------------------------------------------------------------------------

CUSTOM = "custom"
SCHEDULE_CHOICES = [*PRESETS, CUSTOM]


def resolve_schedule(choice: str, schedule_json: str, meta: PrunedWanMeta) -> TokenSchedule:
    """A preset for the teacher's depth, or the custom schedule: inline JSON, or the name of a file in
    models/pare_token_schedules (never a path elsewhere: see model_files). Validated against the model's blocks
    (ranges before they are expanded); a schedule for the teacher's depth runs on the blocks a depth-pruned student
    kept."""
    if choice != CUSTOM:
        schedule = preset(choice, meta.dims.num_layers)
    else:
        text = (schedule_json or "").strip()
        if not text:
            raise PareError("PARE Token Reduction: schedule is 'custom' but schedule_json is empty; paste a schedule "
                            "JSON or give the name of a .json file in models/pare_token_schedules")
        depth = meta.dims.num_layers  # the most blocks a schedule may name (a student may run its teacher's)
        if text.startswith("{"):
            schedule = parse_schedule_text(text, "inline schedule_json", depth)
        else:
            token_schedule_dir()  # registered, so folder_paths knows the folder
            schedule = parse_schedule_text(read_model_text(TOKEN_SCHEDULES, text, "token schedule file"), text, depth)
    return schedule.for_model(meta.num_blocks, meta.teacher_blocks, meta.dims.num_layers)


class PARETokenReduction(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARETokenReduction",
            display_name="PARE Token Reduction",
            category="PARE/speed",
            description=(
                "Training-free token reduction for Wan self-attention (AsymRnR): merges similar query and key/value "
                "tokens at the blocks and steps a schedule names, runs attention on fewer tokens and restores the "
                "output. Stacks with PARE routing, pruned students, LoRAs and CFG. Returns a patched copy."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Wan model (teacher or PARE student, routed or not)."),
                io.Combo.Input("schedule", options=SCHEDULE_CHOICES, default="balanced",
                               tooltip="A shipped preset for Wan2.1 1.3B (30 blocks) or 14B (40 blocks), or 'custom' "
                                       "to use schedule_json."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scales every ratio of the schedule (0 = off, bit-identical to no node; "
                                       "ratios are capped at 0.95)."),
                io.Int.Input("matching_cache_steps", default=3, min=1, max=100,
                             tooltip="Reuse each block's token matching for this many steps (1 = match every step). "
                                     "Higher is faster; tokens move little between neighbouring steps."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule reduction may start (0 = first, noisiest step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where reduction stops (1 = last step). Outside the range attention is full."),
                io.String.Input("schedule_json", default="", multiline=True, **ADVANCED,
                                tooltip="For schedule 'custom': a schedule JSON, or the name of a .json file in "
                                        "models/pare_token_schedules (only files there are read). See "
                                        "docs/token_reduction.md for the format; asymrnr-calibrate writes one."),
            ],
            outputs=[io.Model.Output(tooltip="The model with token reduction applied.")],
        )

    @classmethod
    def execute(cls, model, schedule: str, strength: float, matching_cache_steps: int, start_percent: float,
                end_percent: float, schedule_json: str = "") -> io.NodeOutput:
        require("PARE Token Reduction")
        meta = model_meta(model)
        num_blocks = meta.num_blocks
        sched = resolve_schedule(schedule, schedule_json, meta)
        check_percent_range(start_percent, end_percent)
        if not math.isfinite(strength) or strength < 0 or matching_cache_steps < 1:
            raise PareError(f"PARE Token Reduction: strength must be a finite number >= 0 and matching_cache_steps "
                            f">= 1, got strength {strength}, matching_cache_steps {matching_cache_steps}")
        template = ReductionTemplate(sched, strength, matching_cache_steps, start_percent, end_percent)
        return io.NodeOutput(apply_token_reduction(model, template, num_blocks))
