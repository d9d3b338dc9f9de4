"""Settings dataclasses to JSON objects and back, for every config the workbench writes down.

Run folders, vector files and study folders record their settings as JSON, and reading them back
must give the same frozen object (tuples, not lists; nested configs as themselves) or one line
saying which key is unknown or missing. One generic pair of functions does it, so a new field in a
config needs no hand-written conversion. A field whose JSON form is a mapping (a tuple of (key,
value) pairs, such as the package versions of a model load) says so with `metadata=AS_MAPPING`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import DesteinError

AS_MAPPING = {"json": "mapping"}
T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON object of a dataclass instance: nested dataclasses as objects, tuples as lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        out[f.name] = dict(value) if f.metadata == AS_MAPPING else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: Any, *, what: str | None = None) -> T:
    """`cls` rebuilt from `to_dict`'s output; unknown or missing keys are one-line errors."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise DesteinError(f"{what} must be a JSON object, got {type(data).__name__}")
    init = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(init))
    if unknown:
        raise DesteinError(f"unknown {what} settings: {', '.join(unknown)}")
    required = [
        n
        for n, f in init.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise DesteinError(f"{what} is missing {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if init[name].metadata == AS_MAPPING:
            if not isinstance(value, dict):
                raise DesteinError(f"{what}.{name} must be a JSON object")
            values[name] = tuple(value.items())
        else:
            values[name] = _typed(hints[name], value, f"{what}.{name}")
    try:
        return cls(**values)
    except TypeError as e:
        raise DesteinError(f"{what}: {e}") from None


def _typed(hint: Any, value: Any, what: str) -> Any:
    """`value` shaped as `hint` asks: lists become tuples, objects become nested dataclasses."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, list):
            options = [a for a in options if typing.get_origin(a) in (tuple, list) or a in (tuple, list)]
        elif isinstance(value, dict):
            options = [a for a in options if dataclasses.is_dataclass(a)]
        return _typed(options[0], value, what) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, what=what)  # type: ignore[arg-type]
    if (origin is tuple or hint is tuple) and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v, what) for v in value)
        if args and len(args) == len(value):
            return tuple(_typed(a, v, what) for a, v in zip(args, value))
        return tuple(value)
    return value
