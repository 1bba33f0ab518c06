"""JSON for frozen dataclasses, in one place.

Every artifact autoseg writes (fingerprint, plans, splits, selection, ...) is a frozen dataclass. This module
turns one into plain JSON values (numpy scalars and arrays become Python numbers and lists, tuples become lists,
paths become strings) and back, checking every key and value against the dataclass's type hints. An unknown key
or a value of the wrong type raises :class:`~autoseg.errors.ConfigError` naming the field and the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np

from autoseg.errors import ConfigError
from autoseg.files import write_text_atomic

T = TypeVar("T")

#: Field metadata key: a field marked ``metadata={OMIT_DEFAULT: True}`` is left out of the JSON while it holds its
#: default, so that adding an optional field keeps the files written before it byte-identical.
OMIT_DEFAULT = "omit_default"

__all__ = ["OMIT_DEFAULT", "to_jsonable", "from_jsonable", "save_json", "load_json", "field_type", "coerce"]


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy values, tuples and paths into JSON-ready Python values (recursively)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get(OMIT_DEFAULT) and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (parsed JSON) against type ``tp`` and build dataclasses/tuples from it.

    ``where`` names the field for error messages (for example ``"plans.json: configurations.2d.batch_size"``).
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
        return from_jsonable(tp, value, where=where)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp is dict:
        key_tp, val_tp = get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return {coerce(k, key_tp, where): coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is float:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    raise TypeError(f"serialization does not support type {tp!r} at {where}")


def from_jsonable(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a parsed-JSON mapping; unknown keys and wrong types raise ConfigError."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}: " if where else ""
    if unknown:
        raise ConfigError(f"{prefix}unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}missing key {name!r} for {cls.__name__}")
    return cls(**kwargs)


def field_type(cls: type, name: str) -> Any:
    """The resolved type hint of dataclass field ``name`` (raises KeyError when there is none)."""
    return get_type_hints(cls)[name]


def save_json(obj: Any, path: Path) -> None:
    """Write ``obj`` (a dataclass or JSON-ready value) to ``path`` atomically, indented for people to read."""
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def load_json(cls: type[T], path: Path, *, format_version: int | None = None) -> T:
    """Read dataclass ``cls`` from ``path``; the file's ``format`` must equal ``format_version`` when given."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if format_version is not None and data.get("format") != format_version:
        raise ConfigError(
            f"{path}: format {data.get('format')!r} is not the supported format {format_version}; "
            "re-create it with this version of autoseg"
        )
    return from_jsonable(cls, data, where=path.name)
