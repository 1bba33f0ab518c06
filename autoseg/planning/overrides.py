"""``--set key=value`` overrides of plan fields, validated against the field types.

Keys are dotted paths. ``3d_fullres.batch_size=4`` changes one configuration; a key that starts with a
configuration field instead of a configuration name (``training.epochs=50``, ``loss.name=dice_topk``) changes
every configuration. Values are JSON (``4``, ``0.5``, ``true``, ``[1, 2]``, ``"text"``) or bare text for strings.
An unknown key or a wrong type raises ConfigError listing the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, get_type_hints

from autoseg.errors import ConfigError
from autoseg.planning.plans import Configuration, Plans
from autoseg.serialization import coerce

__all__ = ["apply_overrides", "parse_override"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). Values are parsed as JSON when possible, else kept as text."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. training.epochs=50")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return [part for part in key.strip().split(".") if part], value


def _set(obj: Any, path: list[str], value: Any, where: str) -> Any:
    """Return a copy of dataclass ``obj`` with the field at ``path`` set to ``value`` (type-checked)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        if isinstance(obj, dict) and len(path) == 1:
            return {**obj, path[0]: value}
        raise ConfigError(f"{where}: cannot set a field inside a {type(obj).__name__}")
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        raise ConfigError(f"{where}: unknown key {head!r} for {type(obj).__name__}; valid keys: {sorted(names)}")
    if len(path) == 1:
        new = coerce(value, hints[head], where)
    else:
        new = _set(getattr(obj, head), path[1:], value, where)
    return dataclasses.replace(obj, **{head: new})


def apply_overrides(plans: Plans, overrides: Sequence[str]) -> Plans:
    """Apply ``key=value`` overrides (see module doc) and record each in the affected configuration's ``why``."""
    config_fields = {f.name for f in dataclasses.fields(Configuration)}
    for text in overrides:
        path, value = parse_override(text)
        if not path:
            raise ConfigError(f"override {text!r} has an empty key")
        if path[0] in plans.configurations:
            targets, field_path = [path[0]], path[1:]
        elif path[0] in config_fields:
            targets, field_path = list(plans.configurations), path
        else:
            raise ConfigError(
                f"override {text!r}: {path[0]!r} is neither a configuration ({', '.join(plans.configurations)}) "
                f"nor a configuration field; valid: {sorted(config_fields)}"
            )
        if not field_path:
            raise ConfigError(f"override {text!r}: name a field of {path[0]}, e.g. {path[0]}.batch_size=2")
        configurations = dict(plans.configurations)
        for name in targets:
            updated = _set(configurations[name], field_path, value, f"--set {text}")
            configurations[name] = updated.with_reason(f"{'.'.join(field_path)} set to {value!r} by --set")
        plans = dataclasses.replace(plans, configurations=configurations)
    return plans
