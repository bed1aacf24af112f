"""A router's budget calibration: which threshold spends a given share of the block compute over a whole run.

PARE Apply Router's ``budget`` means "spend this share of the block compute over the sampling run". A router
spends unevenly across steps and inputs (that is its point), so one threshold per budget, chosen on held-out
inputs spread over the whole schedule, honours the budget on average while keeping the router's own
preferences: a step or input it rates highly still runs more blocks than one it rates low. Training
(``python -m training export`` and ``python -m training calibrate-router``) measures that family of thresholds
and stores it in the router file under its own header key, ``pare_router_budget``, next to the router's spec
(``pare_router``). A file without it still loads everywhere (older packs ignore the key).

Stored JSON (format_version 1)::

    {"format_version": 1, "budgets": [0.3, ..., 1.0] (ascending), "thresholds": [...] (non-increasing),
     "spent": [...] (executed share on the calibration inputs), "held_out_spent": [...] (on other inputs),
     "validated_budgets": [...] (the budgets that passed validation), "pin_first": 1, "pin_last": 1,
     "model_fingerprint": "...", "inputs": 240, "note": "..."}

Between two calibrated budgets the threshold is interpolated linearly; outside the calibrated range it is clamped.
A budget is *validated* when it is a validated calibrated budget or lies between two consecutive ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Mapping

from .errors import PareFormatError
from .safetensors_io import load_tensors, read_header, save_atomic

BUDGET_KEY = "pare_router_budget"
CALIBRATION_VERSION = 1
_EPS = 1e-9


@dataclass(frozen=True)
class BudgetCalibration:
    """Thresholds that spend each budget on the calibration inputs, and the budgets validated elsewhere."""

    budgets: tuple[float, ...]
    thresholds: tuple[float, ...]
    spent: tuple[float, ...]
    held_out_spent: tuple[float, ...] = ()
    validated_budgets: tuple[float, ...] = ()
    pin_first: int = 1
    pin_last: int = 1
    model_fingerprint: str = ""
    inputs: int = 0
    note: str = ""
    # Not stored: where it came from, for messages.
    source: str = field(default="router", compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f"{self.source}: '{BUDGET_KEY}'"
        n = len(self.budgets)
        if n == 0:
            raise PareFormatError(f"{where} has no budgets")
        for name in ("thresholds", "spent"):
            if len(getattr(self, name)) != n:
                raise PareFormatError(f"{where} field '{name}' has {len(getattr(self, name))} values for {n} budgets")
        if self.held_out_spent and len(self.held_out_spent) != n:
            raise PareFormatError(f"{where} field 'held_out_spent' has {len(self.held_out_spent)} values for "
                                  f"{n} budgets")
        for name in ("budgets", "thresholds", "spent", "held_out_spent", "validated_budgets"):
            for v in getattr(self, name):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                    raise PareFormatError(f"{where} field '{name}' holds {v!r}; every value must be in [0, 1]")
        if any(b >= a_next for b, a_next in zip(self.budgets, self.budgets[1:])):
            raise PareFormatError(f"{where} field 'budgets' must be strictly ascending, got {list(self.budgets)}")
        if any(t_next > t + _EPS for t, t_next in zip(self.thresholds, self.thresholds[1:])):
            raise PareFormatError(f"{where} field 'thresholds' must not increase with the budget, got "
                                  f"{list(self.thresholds)}")
        unknown = [b for b in self.validated_budgets if not any(abs(b - c) <= _EPS for c in self.budgets)]
        if unknown:
            raise PareFormatError(f"{where} field 'validated_budgets' holds {unknown}, which are not calibrated budgets")
        for name in ("pin_first", "pin_last", "inputs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PareFormatError(f"{where} field '{name}' must be a non-negative integer, got {v!r}")

    # -- use -------------------------------------------------------------------------------------------------
    def threshold_for(self, budget: float) -> float:
        """The threshold for ``budget``: interpolated linearly between calibrated budgets, clamped outside them."""
        b, t = self.budgets, self.thresholds
        if budget <= b[0]:
            return float(t[0])
        if budget >= b[-1]:
            return float(t[-1])
        k = next(i for i in range(1, len(b)) if budget <= b[i])
        w = (budget - b[k - 1]) / (b[k] - b[k - 1])
        return float(t[k - 1] + w * (t[k] - t[k - 1]))

    def is_calibrated(self, budget: float) -> bool:
        """Inside the calibrated range (no clamping)."""
        return self.budgets[0] - _EPS <= budget <= self.budgets[-1] + _EPS

    def _validated_points(self) -> list[bool]:
        return [any(abs(b - v) <= _EPS for v in self.validated_budgets) for b in self.budgets]

    def is_validated(self, budget: float) -> bool:
        """A validated calibrated budget, or between two consecutive calibrated budgets that are both validated."""
        return any(a - _EPS <= budget <= b + _EPS for a, b in self.validated_ranges())

    def validated_ranges(self) -> list[tuple[float, float]]:
        """The validated budgets as closed ranges of consecutive validated calibrated budgets, e.g. [(0.4, 0.9)]."""
        ok = self._validated_points()
        out: list[tuple[float, float]] = []
        for i, b in enumerate(self.budgets):
            if ok[i]:
                if i > 0 and ok[i - 1]:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((b, b))
        return out

    def describe_validated(self) -> str:
        ranges = self.validated_ranges()
        if not ranges:
            return "none"
        return ", ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in ranges)

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return {"format_version": CALIBRATION_VERSION, **{k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in d.items()}}

    @classmethod
    def from_json(cls, obj: object, source: str = "router") -> "BudgetCalibration":
        if not isinstance(obj, Mapping):
            raise PareFormatError(f"{source}: '{BUDGET_KEY}' metadata is not a JSON object")
        version = obj.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CALIBRATION_VERSION:
            raise PareFormatError(f"{source}: '{BUDGET_KEY}' format_version {version!r} is not supported (this pack "
                                  f"reads up to {CALIBRATION_VERSION}); update comfyui-pare")
        missing = [k for k in ("budgets", "thresholds", "spent") if k not in obj]
        if missing:
            raise PareFormatError(f"{source}: '{BUDGET_KEY}' lacks {missing}")

        def floats(name: str) -> tuple[float, ...]:
            v = obj.get(name, [])
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise PareFormatError(f"{source}: '{BUDGET_KEY}' field '{name}' must be a list of numbers, got {v!r}")
            if not all(math.isfinite(x) for x in v):
                raise PareFormatError(f"{source}: '{BUDGET_KEY}' field '{name}' holds a non-finite value")
            return tuple(float(x) for x in v)

        def integer(name: str, default: int) -> int:
            v = obj.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int):
                raise PareFormatError(f"{source}: '{BUDGET_KEY}' field '{name}' must be an integer, got {v!r}")
            return v

        return cls(budgets=floats("budgets"), thresholds=floats("thresholds"), spent=floats("spent"),
                   held_out_spent=floats("held_out_spent"), validated_budgets=floats("validated_budgets"),
                   pin_first=integer("pin_first", 1), pin_last=integer("pin_last", 1),
                   model_fingerprint=str(obj.get("model_fingerprint", "")), inputs=integer("inputs", 0),
                   note=str(obj.get("note", "")), source=source)


def read_budget_calibration(path: str | os.PathLike) -> BudgetCalibration | None:
    """The budget calibration stored in a router file, or None when it has none. Malformed: PareFormatError."""
    _, metadata = read_header(str(path))
    if BUDGET_KEY not in metadata:
        return None
    try:
        obj = json.loads(metadata[BUDGET_KEY])
    except json.JSONDecodeError as e:
        raise PareFormatError(f"{path}: '{BUDGET_KEY}' metadata is not valid JSON ({e})") from e
    return BudgetCalibration.from_json(obj, source=str(path))


def write_budget_calibration(path: str | os.PathLike, calibration: BudgetCalibration | None,
                             out: str | os.PathLike | None = None) -> None:
    """Store ``calibration`` in the router file ``path`` (or a copy at ``out``), atomically; tensors and the other
    metadata are kept bit for bit. ``None`` removes a stored calibration."""
    tensors, metadata = load_tensors(str(path))
    metadata = dict(metadata)
    if calibration is None:
        metadata.pop(BUDGET_KEY, None)
    else:
        metadata[BUDGET_KEY] = json.dumps(calibration.to_json(), separators=(",", ":"))
    save_atomic(out if out is not None else path, tensors, metadata)
