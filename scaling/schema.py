"""Strict YAML -> frozen dataclass loading, shared by every kind of study file.

A study file is read once into a mapping, `--set key=value` overrides are applied by dotted
path, and the mapping is built into frozen config dataclasses field by field: an unknown key,
a wrong type or a bad value fails with the key's dotted path and the fix, before any work.
The dataclasses validate their own values in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from scaling.errors import ConfigError

YAML_RENAMES = {"lambda": "lam"}
"""YAML key -> dataclass field (`lambda` is a Python keyword)."""


def read_study_mapping(path: str | Path, overrides: typing.Sequence[str] = (), *,
                       example: str = "search_spaces/smoke.yaml") -> dict[str, Any]:
    """A study file's top-level mapping with `key=value` overrides applied (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} not found; pass a YAML file such as {example}")
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"study file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          f"pass a YAML study file such as {example}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raise ConfigError(f"study file {str(path)!r} is empty (no study keys); copy {example} and edit it")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys at the top level, got "
                          f"{type(raw).__name__}; see {example}")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`key.sub=value` (value parsed as YAML) into the nested mapping."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.max_steps=20")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def as_list(value: Any, key: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def build_config(cls, raw: Any, where: str):
    """Build dataclass `cls` from a mapping, checking every key against the fields' type hints."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'study'}: expected a mapping, got {type(raw).__name__} ({raw!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = YAML_RENAMES.get(key, key)
        dotted = f"{where}.{key}" if where else str(key)
        if name not in fields:
            valid = sorted({k for k, v in YAML_RENAMES.items() if v in fields} | set(fields) - set(YAML_RENAMES.values()))
            raise ConfigError(f"unknown key {dotted!r}; valid keys here: {', '.join(valid)}")
        kwargs[name] = coerce(hints[name], value, dotted)
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ConfigError(f"{where or 'study file'}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{where or 'study'}: {exc}") from None


def coerce(hint, value, dotted: str):
    """Check `value` against a field's type hint; convert lists to tuples and nested dicts to configs."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. int | dict[str, int]: the first alternative that accepts the value
            for alternative in inner:
                try:
                    return coerce(alternative, value, dotted)
                except ConfigError:
                    continue
            raise ConfigError(f"{dotted}={value!r}: expected one of {[getattr(a, '__name__', str(a)) for a in inner]}")
        return coerce(inner[0], value, dotted)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, dotted)
    if origin is tuple:
        if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
            value = [value]  # `tasks: paper10` means [paper10]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted}={value!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{dotted}={value!r}: expected a list of {len(args)} values")
        return tuple(coerce(a, v, f"{dotted}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}={value!r}: expected a mapping")
        key_hint, value_hint = args
        return {coerce(key_hint, k, f"{dotted}.{k}"): coerce(value_hint, v, f"{dotted}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}={value!r}: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}={value!r}: expected an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}={value!r}: expected true or false")
        return value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and dotted.endswith("layers"):
            return str(value)  # `layers: 3` means block 3
        if isinstance(value, list) and dotted.endswith("layers"):
            return ",".join(str(v) for v in value)  # `layers: [0, 3]` means blocks 0 and 3
        if not isinstance(value, str):
            raise ConfigError(f"{dotted}={value!r}: expected a string")
        return value
    return value


def to_plain(obj):
    """Dataclasses -> plain dicts with the YAML key names, so the output loads back as a study."""
    if dataclasses.is_dataclass(obj):
        yaml_names = {field: key for key, field in YAML_RENAMES.items()}
        return {yaml_names.get(f.name, f.name): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys, for MLflow params."""
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_hash(payload: dict[str, Any]) -> str:
    """A short, stable hash of a resolved config: same config, same run."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
