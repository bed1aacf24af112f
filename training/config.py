"""Typed configs: dataclasses loaded from TOML (``tomllib``), validated before any compute, saved as TOML.

A config class is a (nested) dataclass whose fields are ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``list[...]``, ``X | None`` or another config dataclass (a TOML table). Fields typed ``InputPath`` must name an
existing file or folder; relative paths are taken relative to the config file's folder and stored absolute, so a
saved config (beside every checkpoint) resumes from any working directory. Every error names the field
(``train.learning_rate``) and what was expected. ``--set section.key=value`` overrides use the same checks.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the `train` extra installs tomli there)
    import tomli as tomllib

from comfyui_pare.safetensors_io import atomic_write_text

InputPath = Annotated[str, "input-path"]  # a file or folder that must exist when the config is loaded
OutputPath = Annotated[str, "output-path"]  # resolved like an input path, not required to exist
T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not match its schema; the message names the field."""


def _marker(tp: Any) -> str | None:
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, str)), None)
    return None


def _strip(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _type_name(tp: Any) -> str:
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, field: str, base: Path) -> Any:
    marker, tp = _marker(tp), _strip(tp)
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config field '{field}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, field, base)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config field '{field}': must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{field}[{i}]", base) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{field}': expected a table [{field}], got {type(value).__name__}")
        return from_dict(tp, value, base, prefix=f"{field}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        if marker in ("input-path", "output-path"):
            path = Path(os.path.expanduser(value))
            path = (path if path.is_absolute() else base / path).resolve()
            if marker == "input-path" and not path.exists():
                raise ConfigError(f"config field '{field}': {path} does not exist")
            return str(path)
        return value
    raise TypeError(f"config field '{field}': unsupported schema type {tp!r}")  # a bug in the schema, not the file


def from_dict(cls: type[T], data: dict, base: str | os.PathLike = ".", prefix: str = "") -> T:
    """Build and validate ``cls`` from a dict (a parsed TOML document); paths resolve against ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"config field '{prefix}{unknown[0]}' is not a known option (known in "
                          f"'{prefix.rstrip('.') or '<root>'}': {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], name, Path(base))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(_strip(hints[f.name])):  # a table whose fields all have defaults
                kwargs[f.name] = _convert({}, hints[f.name], name, Path(base))
            else:
                raise ConfigError(f"config field '{name}' is required")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def load_config(cls: type[T], path: str | os.PathLike, overrides: list[str] | None = None) -> T:
    """Parse a TOML file into ``cls``; ``overrides`` are ``section.key=value`` strings (TOML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string: --set train.device=cuda
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a table")
        node[leaf] = value
    try:
        return from_dict(cls, data, base=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(obj: Any) -> dict:
    """The config as plain data (None fields dropped: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(obj: Any) -> str:
    """Serialise a config dataclass as TOML that ``load_config`` reads back to an equal object."""
    data = to_dict(obj)
    lines: list[str] = []

    def table(d: dict, name: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if name and scalars:
            lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        if scalars:
            lines.append("")
        for k, v in d.items():
            if isinstance(v, dict):
                table(v, f"{name}.{k}" if name else k)

    table(data, "")
    return "\n".join(lines)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (absolute paths, every default spelled out)."""
    atomic_write_text(path, to_toml(obj))
