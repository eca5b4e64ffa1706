"""Typed dataclass configs: defaults in code, overridden by a YAML file, then by key=value arguments.

Every config is a dataclass deriving from Config, whose __post_init__ checks every field (validate: finite
numbers, lower bounds, plain names) and makes local paths absolute; a config's own __post_init__ adds the
checks that are its alone. So a config that exists is a valid one, however it was made: from the command
line, from YAML, or in code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def bounded(default: Any, at_least: float | None = None, above: float | None = None) -> Any:
    """A numeric setting with a lower bound, which load_config checks (None stays allowed)."""
    return dataclasses.field(default=default, metadata={"at_least": at_least, "above": above})


def plain_name(default: str | None = None) -> Any:
    """A setting that names a folder under another (a run under `storage`): no path separators, no "..",
    so a name can never write outside its parent."""
    return dataclasses.field(default=default, metadata={"plain_name": True})


def local_path(default: str) -> Any:
    """A setting that is a local path or a URL (s3://...): load_config makes a relative local path absolute,
    because Ray runs trials and workers in working directories of their own."""
    return dataclasses.field(default=default, metadata={"path": True})


def absolute(path: str) -> str:
    """A local path made absolute (from the current directory); URLs and "" as they are."""
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def _problem(value: Any, meta: typing.Mapping) -> str | None:
    """What is wrong with one setting's value, or None."""
    if isinstance(value, (list, tuple)):  # each item under the field's bounds
        return next((p for p in (_problem(v, meta) for v in value) if p), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, dict):
        bad = [k for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)]
        return f"entries {bad} must be finite numbers" if bad else None
    if value is None or isinstance(value, bool):
        return None
    if meta.get("at_least") is not None and value < meta["at_least"]:
        return f"must be at least {meta['at_least']}, got {value}"
    if meta.get("above") is not None and value <= meta["above"]:
        return f"must be greater than {meta['above']}, got {value}"
    if meta.get("plain_name") and (value in ("", ".", "..") or any(c in value for c in "/\\")):
        return f"must be a plain name (no '/', '\\' or '..'), got {value!r}"
    return None


def validate(cfg: Any) -> None:
    """Refuse settings no run could mean: non-finite numbers anywhere, values under a field's bound,
    path-like names. One check for every job's config; the error names the setting."""
    for f in dataclasses.fields(cfg):
        problem = _problem(getattr(cfg, f.name), f.metadata)
        if problem:
            raise ValueError(f"config {f.name}: {problem}")


@dataclasses.dataclass
class Config:
    """The base of every typed config (see the module docstring)."""

    def __post_init__(self) -> None:
        validate(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("path") and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, absolute(getattr(self, f.name)))


def parse_scalar(text: str) -> Any:
    """A number where the text reads as one (YAML alone takes "1e-7" for a string), else YAML's reading."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):  # e.g. int | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if origin in (list, tuple):
        if isinstance(value, str):  # "[1, 2]", "1,2", or a size "48x64"
            separator = "x" if re.fullmatch(r"\d+x\d+", value) else ","
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(separator) if v]
        elif not isinstance(value, (list, tuple)):  # one value where a list is wanted (image_size: 64)
            value = [value]
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return origin(_coerce(name, v, item) for v in value)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ValueError(f"config {name}: expected a mapping such as {{nu: 0.1}}, got {value!r}")
        return {str(k): parse_scalar(v) if isinstance(v, str) else v for k, v in value.items()}
    if annotation is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"config {name}: expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if annotation in (int, float, str, bool):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {name}: expected {annotation.__name__}, got {value!r}") from None
    return value


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, extra: dict | None = None
) -> T:
    """cls's defaults <- YAML file at path <- overrides like ["epochs=3", "params.nu=0.1"] <- extra values.

    A dotted override sets one entry of a mapping field (params.nu=0.1); a mapping in extra adds to the
    same mapping from the file (e.g. a sweep's search space).
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(yaml.safe_load(Path(path).read_text()) or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if "." in key:
            field_name, entry = key.split(".", 1)
            mapping = values.get(field_name) or {}
            if isinstance(mapping, str):  # an earlier `params={...}` on the same command line
                mapping = yaml.safe_load(mapping) or {}
            values[field_name] = {**mapping, entry: parse_scalar(value)}
        else:
            values[key] = value
    for key, value in (extra or {}).items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})  # (checked by its __post_init__)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
