"""Token-reduction schedules: which feature (queries, keys/values), at which blocks and timesteps, by how much.

JSON form (a file, or the same text inline)::

    {"format": "pare_token_schedule", "format_version": 1,
     "num_blocks": 30,                      # optional: the depth it was made for (checked against the model)
     "stride": [1, 2, 2], "metric": "cosine", "mode": "mean", "proportional": true, "seed": 0,
     "rules": [{"feature": "q",  "blocks": "2-27", "start_percent": 0.2, "end_percent": 1.0, "ratio": 0.5},
               {"feature": "kv", "blocks": [4, 5, 6], "ratio": 0.25}]}

``feature`` is ``q`` or ``kv``; ``blocks`` is ``"all"``, a range text (``"2-27"``, ``"0-3,8"``; both ends
included) or a list of block indices; ``start_percent``/``end_percent`` are ComfyUI's schedule positions
(0 = first, noisiest step; default 0 and 1), turned into sigmas with the sampled model's own
``percent_to_sigma``; ``ratio`` in [0, 1) is the fraction of tokens removed. Where several rules cover a block and
step, the largest ratio wins. Every error names the file (or "inline schedule") and the field at fault.

The shipped presets (``preset``) are hand-set from AsymRnR's findings, not calibrated on real Wan weights:
the first and last blocks and the first, structure-forming steps are left alone, queries are reduced more than
keys/values. ``python -m training asymrnr-calibrate`` measures a model and writes a schedule for it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import PareError
from .token_reduction import METRICS, MODES
from .untrusted import load_json, quote, read_text_file

FORMAT = "pare_token_schedule"
FORMAT_VERSION = 1
FEATURES = ("q", "kv")
PRESETS = ("conservative", "balanced", "fast")
MAX_RATIO = 0.95  # strength never pushes a ratio past this: at least 5% of the tokens always stay
# Wan2.1 depths the presets are written for (``wan.WAN21_1_3B`` has 30 blocks, ``wan.WAN21_14B`` 40).
PRESET_DEPTHS = {30: "Wan2.1 1.3B", 40: "Wan2.1 14B"}
# Matched against a stripped part, so no two whitespace runs touch (no backtracking blow-up on long blanks).
_RANGE = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")
MAX_BLOCKS = 1024  # the deepest model a schedule may name without a model to check it against (Wan2.1: 30 or 40)
MAX_RULES = 4096
_MAX_DIGITS = 18  # int() of a longer number is refused by Python itself (and never a block)
_KNOWN = {"format", "format_version", "num_blocks", "stride", "metric", "mode", "proportional", "seed", "rules",
          "name", "calibration"}
_RULE_KNOWN = {"feature", "blocks", "start_percent", "end_percent", "ratio"}


@dataclass(frozen=True)
class ReductionRule:
    feature: str  # "q" or "kv"
    blocks: tuple[int, ...]
    ratio: float
    start_percent: float = 0.0
    end_percent: float = 1.0


@dataclass(frozen=True)
class TokenSchedule:
    rules: tuple[ReductionRule, ...]
    stride: tuple[int, int, int] = (1, 2, 2)
    metric: str = "cosine"
    mode: str = "mean"
    proportional: bool = True
    seed: int = 0
    num_blocks: int | None = None
    name: str = "schedule"
    calibration: dict = field(default_factory=dict, compare=False)  # what asymrnr-calibrate measured (informative)

    def check_blocks(self, num_blocks: int) -> None:
        """Refuse a schedule made for another depth or naming a block the model does not have."""
        if self.num_blocks is not None and self.num_blocks != num_blocks:
            raise PareError(f"{self.name}: made for {self.num_blocks} blocks, but the model has {num_blocks}")
        for i, rule in enumerate(self.rules):
            bad = [b for b in rule.blocks if b >= num_blocks]
            if bad:
                raise PareError(f"{self.name}: rules[{i}].blocks names block {bad[0]}, but the model has blocks "
                                f"0-{num_blocks - 1}")

    def for_model(self, num_blocks: int, teacher_blocks: tuple[int, ...] | None = None,
                  teacher_depth: int | None = None) -> "TokenSchedule":
        """This schedule on a model's own blocks, validated.

        A depth-pruned student (VDMini-style, fewer blocks than its teacher) runs a schedule written for the
        teacher's depth (``num_blocks`` = ``teacher_depth``, e.g. a preset) on the blocks it kept: student block j
        is teacher block ``teacher_blocks[j]``; rules on removed blocks are dropped. Any other schedule must be
        numbered in the model's own blocks."""
        if (teacher_blocks is not None and teacher_depth is not None and self.num_blocks == teacher_depth
                and num_blocks != teacher_depth):
            index = {t: j for j, t in enumerate(teacher_blocks)}
            rules = tuple(replace(r, blocks=tuple(index[b] for b in r.blocks if b in index)) for r in self.rules)
            out = replace(self, rules=tuple(r for r in rules if r.blocks), num_blocks=num_blocks,
                          name=f"{self.name} on the {num_blocks} kept blocks")
        else:
            out = self
        out.check_blocks(num_blocks)
        return out

    def ratios(self, block: int, sigma: float, percent_to_sigma: Callable[[float], float],
               strength: float = 1.0) -> tuple[float, float]:
        """(query ratio, key/value ratio) at ``block`` and ``sigma``, scaled by ``strength`` (capped at MAX_RATIO)."""
        out = {"q": 0.0, "kv": 0.0}
        for rule in self.rules:
            if block in rule.blocks and percent_to_sigma(rule.end_percent) <= sigma <= percent_to_sigma(rule.start_percent):
                out[rule.feature] = max(out[rule.feature], rule.ratio)
        return tuple(min(MAX_RATIO, r * strength) if r > 0 else 0.0 for r in (out["q"], out["kv"]))

    @property
    def max_ratio(self) -> float:
        return max((r.ratio for r in self.rules), default=0.0)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name}
        if self.num_blocks is not None:
            d["num_blocks"] = self.num_blocks
        d.update(stride=list(self.stride), metric=self.metric, mode=self.mode, proportional=self.proportional,
                 seed=self.seed, rules=[{**asdict(r), "blocks": format_blocks(r.blocks)} for r in self.rules])
        if self.calibration:
            d["calibration"] = self.calibration
        return d


def format_blocks(blocks: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    parts, run = [], []
    for b in sorted(set(blocks)):
        if run and b != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(b)
    if run:
        parts.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def _fail(source: str, where: str, what: str) -> PareError:
    return PareError(f"{source}: {where} {what}")


def _number(value: Any, source: str, where: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _fail(source, where, f"must be {'an integer' if integer else 'a number'}, got {quote(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # (an int is finite; isfinite overflows on huge ones)
        raise _fail(source, where, f"must be finite, got {value!r}")
    return value


def _parse_blocks(value: Any, source: str, where: str, num_blocks: int | None, model_blocks: int | None
                  ) -> tuple[int, ...]:
    """The block indices of a rule. Every index and range end is checked against the schedule's ``num_blocks``
    and the model's depth (``model_blocks``, else MAX_BLOCKS) before anything is expanded, so the work is bounded
    by the model, not by the numbers in the text."""
    if value == "all":
        if num_blocks is None:
            raise _fail(source, where, "is 'all', which needs the schedule's num_blocks")
        return tuple(range(num_blocks))

    def check(low: int, high: int) -> None:
        if num_blocks is not None and high >= num_blocks:
            raise _fail(source, where, f"names block {high}, but num_blocks is {num_blocks}")
        limit = model_blocks if model_blocks is not None else MAX_BLOCKS
        if high >= limit:
            raise _fail(source, where, f"names block {max(low, limit)}, but the model has blocks 0-{limit - 1}")

    blocks: set[int] = set()
    if isinstance(value, str):
        for part in value.split(","):
            text = part.strip()
            m = _RANGE.fullmatch(text)
            if not m:
                raise _fail(source, where, f"has {quote(text)}, not a block or a range 'A-B'")
            if any(len(g) > _MAX_DIGITS for g in m.groups() if g):
                raise _fail(source, where, f"has {quote(text)}, a block number of more than {_MAX_DIGITS} digits")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise _fail(source, where, f"has the reversed range {quote(text)}")
            check(a, b)
            blocks.update(range(a, b + 1))
    elif isinstance(value, list) and value:
        for j, b in enumerate(value):
            b = _number(b, source, f"{where}[{j}]", integer=True)
            if b < 0:
                raise _fail(source, where, f"has a negative block {quote(b)}")
            check(b, b)
            blocks.add(b)
    else:
        raise _fail(source, where, f"must be 'all', a range text like '2-27' or a non-empty list, got {quote(value)}")
    return tuple(sorted(blocks))


def _parse_rule(obj: Any, source: str, where: str, num_blocks: int | None, model_blocks: int | None
                ) -> ReductionRule:
    if not isinstance(obj, dict):
        raise _fail(source, where, f"must be an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _RULE_KNOWN)
    if unknown:
        raise _fail(source, f"{where}.{quote(unknown[0])[1:-1]}", f"is not a rule field (fields: {sorted(_RULE_KNOWN)})")
    for key in ("feature", "blocks", "ratio"):
        if key not in obj:
            raise _fail(source, where, f"lacks '{key}'")
    if obj["feature"] not in FEATURES:
        raise _fail(source, f"{where}.feature", f"must be one of {list(FEATURES)}, got {quote(obj['feature'])}")
    ratio = _number(obj["ratio"], source, f"{where}.ratio")
    if not 0.0 <= ratio < 1.0:
        raise _fail(source, f"{where}.ratio", f"must be in [0, 1), got {ratio}")
    start = _number(obj.get("start_percent", 0.0), source, f"{where}.start_percent")
    end = _number(obj.get("end_percent", 1.0), source, f"{where}.end_percent")
    if not 0.0 <= start <= end <= 1.0:
        raise _fail(source, where, f"start_percent {start} and end_percent {end} must satisfy 0 <= start <= end <= 1")
    return ReductionRule(obj["feature"], _parse_blocks(obj["blocks"], source, f"{where}.blocks", num_blocks, model_blocks),
                         float(ratio), float(start), float(end))


def schedule_from_json(obj: Any, source: str = "inline schedule", model_blocks: int | None = None) -> TokenSchedule:
    """Validate a parsed JSON schedule; ``source`` (a file name) is named in every error.

    ``model_blocks``: the most blocks the schedule may name (the model's depth; a depth-pruned student's teacher
    depth), so a hostile range is refused before it is expanded; without it, MAX_BLOCKS."""
    if not isinstance(obj, dict):
        raise PareError(f"{source}: a token schedule must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise _fail(source, f"field {quote(unknown[0])}", f"is unknown (fields: {sorted(_KNOWN)})")
    if obj.get("format", FORMAT) != FORMAT:
        raise _fail(source, "field 'format'", f"must be {FORMAT!r}, got {quote(obj['format'])}")
    if obj.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise _fail(source, "field 'format_version'", f"is {quote(obj['format_version'])}; this version reads {FORMAT_VERSION}")
    num_blocks = obj.get("num_blocks")
    if num_blocks is not None:
        limit = model_blocks if model_blocks is not None else MAX_BLOCKS
        if _number(num_blocks, source, "field 'num_blocks'", integer=True) < 1:
            raise _fail(source, "field 'num_blocks'", f"must be positive, got {num_blocks}")
        if num_blocks > limit:  # checked here, before 'all' expands it
            raise PareError(f"{source}: made for {quote(num_blocks)} blocks, but the model has {limit}"
                            if model_blocks is not None else
                            f"{source}: field 'num_blocks' is {quote(num_blocks)}; at most {MAX_BLOCKS} are supported")
    stride = obj.get("stride", [1, 2, 2])
    if not (isinstance(stride, list) and len(stride) == 3 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                    and s >= 1 for s in stride)):
        raise _fail(source, "field 'stride'", f"must be three positive integers [frames, rows, columns], got {quote(stride)}")
    if math.prod(stride) < 2:
        raise _fail(source, "field 'stride'", "must cover at least 2 tokens (every token would be a destination)")
    metric, mode = obj.get("metric", "cosine"), obj.get("mode", "mean")
    if metric not in METRICS:
        raise _fail(source, "field 'metric'", f"must be one of {list(METRICS)}, got {quote(metric)}")
    if mode not in MODES:
        raise _fail(source, "field 'mode'", f"must be one of {list(MODES)}, got {quote(mode)}")
    proportional = obj.get("proportional", True)
    if not isinstance(proportional, bool):
        raise _fail(source, "field 'proportional'", f"must be true or false, got {quote(proportional)}")
    seed = int(_number(obj.get("seed", 0), source, "field 'seed'", integer=True))
    rules = obj.get("rules")
    if not isinstance(rules, list):
        raise _fail(source, "field 'rules'", f"must be a list of rules, got {quote(rules)}")
    if len(rules) > MAX_RULES:
        raise _fail(source, "field 'rules'", f"has {len(rules)} rules; at most {MAX_RULES} are supported")
    parsed = tuple(_parse_rule(r, source, f"rules[{i}]", num_blocks, model_blocks) for i, r in enumerate(rules))
    calibration = obj.get("calibration", {})
    return TokenSchedule(parsed, tuple(stride), metric, mode, proportional, seed, num_blocks,
                         _name(obj.get("name"), source), calibration if isinstance(calibration, dict) else {})


def _name(value: Any, source: str) -> str:
    """The schedule's display name (it appears in every log line): a short string, else the source."""
    return value if isinstance(value, str) and 0 < len(value) <= 200 else source


def load_schedule(path: str | os.PathLike, model_blocks: int | None = None, source: str | None = None
                  ) -> TokenSchedule:
    """Read and validate a schedule file (a regular file of at most MAX_JSON_BYTES); a missing, unreadable or
    non-JSON file is an error naming it (``source``, default the path)."""
    source = source or str(Path(path))
    text = read_text_file(path, f"token schedule file {source}")
    return parse_schedule_text(text, source, model_blocks)


def parse_schedule_text(text: str, source: str = "inline schedule", model_blocks: int | None = None
                        ) -> TokenSchedule:
    obj = load_json(text, source)
    return schedule_from_json(obj, source, model_blocks)


def save_schedule(path: str | os.PathLike, schedule: TokenSchedule) -> None:
    """Write atomically (a temporary file, then a rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(schedule.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, p)


# Presets as fractions of the depth (first block, last block) and of the schedule, per level:
# (feature, first, last, start_percent, ratio).
_PRESET_RULES = {
    "conservative": [("q", 0.07, 0.93, 0.2, 0.3)],
    "balanced": [("q", 0.07, 0.93, 0.1, 0.5), ("kv", 0.13, 0.87, 0.2, 0.25)],
    "fast": [("q", 0.03, 0.97, 0.1, 0.7), ("kv", 0.07, 0.93, 0.1, 0.4)],
}


def preset(name: str, num_blocks: int) -> TokenSchedule:
    """A shipped schedule for Wan2.1 1.3B (30 blocks) or 14B (40 blocks)."""
    if name not in _PRESET_RULES:
        raise PareError(f"unknown token-reduction preset {name!r}; presets: {list(PRESETS)}")
    if num_blocks not in PRESET_DEPTHS:
        shapes = ", ".join(f"{n} blocks ({label})" for n, label in PRESET_DEPTHS.items())
        raise PareError(f"token-reduction preset {name!r} is made for {shapes}; this model has {num_blocks} blocks: "
                        "give a schedule JSON instead (or make one with asymrnr-calibrate)")
    rules = tuple(ReductionRule(feat, tuple(range(round(a * (num_blocks - 1)), round(b * (num_blocks - 1)) + 1)),
                                ratio, start, 1.0) for feat, a, b, start, ratio in _PRESET_RULES[name])
    return TokenSchedule(rules, num_blocks=num_blocks, name=f"preset {name} ({PRESET_DEPTHS[num_blocks]})")
