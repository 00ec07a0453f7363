"""Typed configuration: frozen dataclasses loaded from YAML and overridden from the CLI.

Every job config is a frozen dataclass. :func:`load` reads YAML into it (unknown keys are an
error naming the valid ones), :func:`override` applies ``a.b=value`` strings, and
:func:`to_dict` gives the resolved config that is saved next to every output (as timm writes
``args.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Resolved config as plain, YAML/JSON-safe data."""
    out = dataclasses.asdict(cfg)
    return typing.cast(dict[str, Any], _plain(out))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for {cls.__name__}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        try:
            kwargs[name] = _coerce(hints.get(name, Any), value)
        except (ValueError, TypeError):
            if isinstance(value, Mapping):
                raise  # a nested section's own message (unknown keys, its own checks)
            # The value is not repeated: a secret pasted in the wrong place must not reach
            # logs or a terminal through this message.
            raise ValueError(f"{cls.__name__}.{name}: expected {_type_name(hints.get(name))}, "
                             f"got a {type(value).__name__} that is not one") from None
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_dict(typing.cast(type, tp), value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value)
        return value
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if tp is float and isinstance(value, int | str):
        return float(value)
    if tp is int and isinstance(value, str):
        return int(value)
    if tp is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return value


def load(cls: type[T], path: str | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path:
        from rootflow.io import storage

        text = storage.read_bytes(path).decode()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            # Position and problem only: PyYAML's own message quotes the offending line,
            # which may hold a secret.
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path} is not valid YAML: "
                             f"{getattr(e, 'problem', None) or type(e).__name__}{where}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys, "
                             f"not a {type(data).__name__}")
    base = from_dict(cls, data)
    return override(base, overrides)


def override(cfg: T, overrides: Iterable[str]) -> T:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a frozen config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        tp: Any = type(cfg)  # the dataclass (or free-form dict) that ``node`` mirrors
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config section {p!r} in override {item!r}")
            node = node[p]
            tp = typing.get_type_hints(tp).get(p, dict) if dataclasses.is_dataclass(tp) else dict
        # Dataclass sections are strict; a free-form dict field (model settings passed through
        # to another config) accepts new keys.
        if parts[-1] not in node and dataclasses.is_dataclass(tp):
            raise ValueError(f"unknown config key {key!r}; valid: {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(type(cfg), data)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
