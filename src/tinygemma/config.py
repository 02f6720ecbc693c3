"""Typed configuration: dataclasses in, checked dataclasses out.

Every concern (model, data, training, generation, ...) owns one dataclass in its stage
module. This module turns those dataclasses into command-line flags, reads them from JSON
files and ``--set key=value`` overrides, and refuses unknown keys and wrong types with a
one-line message instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits non-zero."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list[...], X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, where)
    else:  # pragma: no cover - a programming error in a dataclass definition
        raise TypeError(f"unsupported annotation {tp!r} at {where}")
    raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return UserError(f"{where}: unknown key '{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(key, names, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


MAX_SEED = 2**63  # seeds go to torch/numpy generators, which take a signed 64-bit integer


def check_seed(seed: int | None) -> None:
    """A seed the generators take (None: unseeded), or a one-line UserError."""
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise UserError(f"seed must lie in [0, 2**63), got {seed}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is JSON, or else a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value
