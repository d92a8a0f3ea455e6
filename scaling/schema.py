"""Strict YAML -> frozen dataclass loading, shared by every kind of study file.

A study file is read once into a mapping, `--set key=value` overrides are applied by dotted
path, and the mapping is built into frozen config dataclasses field by field: an unknown key,
a wrong type or a bad value fails with the key's dotted path and the fix, before any work.
The dataclasses validate their own values in `__post_init__`.

Rules that follow from a key's type hold for every key of every study dataclass, here in one place
(`coerce`): a number is finite, >= 0 (no key means anything below zero) and at most `NUMBER_MAX`
(an integer fits int64 and JSON); a seed fits numpy's seeding (0..2**32-1); a list has no entry
twice; a string has no control characters and at most `TEXT_MAX` characters. The YAML itself is
read strictly (`StrictLoader`): a key written twice, deep nesting and anchors/aliases that expand
past a bound are refused. Names that
become folder names go through `check_path_name`. `study_keys` lists every key these rules cover.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from scaling import names
from scaling.errors import ConfigError, short_repr

YAML_RENAMES = {names.LAMBDA: "lam"}
"""YAML key -> dataclass field (`lambda` is a Python keyword)."""

NUMBER_MAX = 1e15
"""No study number means anything above this (a quadrillion tokens, parameters, GB, steps): a larger one is a typo
and would overflow a consumer (int64 step counters, float32 schedules)."""
SEED_KEYS = frozenset({"seed", "seeds", "extra_seeds"})
SEED_MAX = 2**32 - 1
"""The seeds every consumer takes: numpy's default_rng (the data order) refuses negatives, its legacy seeding and
many libraries stop at 2**32-1, torch takes more."""
TEXT_MAX = 4096
"""The longest string a study key may hold (a path of PATH_MAX): nothing legitimate is longer."""
NAME_MAX = 100
"""A name that becomes a folder or file name (`<study>-<rung>-<arm>-s<seed>-<hash>`, sweep trials, reports) stays
under this, leaving the file-name limit's other 155 bytes to the run folder's suffixes."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tag runs code), refusing what silently changes or bloats a study: a key written
    twice (PyYAML keeps the last: a `training:` block pasted twice would replace the first without a word),
    nesting deeper than `MAX_DEPTH`, and anchors/aliases that expand to more than `MAX_VALUES` values or refer
    to themselves (a few hundred bytes of nested aliases expand to gigabytes). Aliases within the bounds load
    as written: `yaml.safe_dump` writes them for an object a script put in a study twice."""

    MAX_DEPTH = 32
    """Nesting a study never needs (it has 4 levels), counted through aliases; deeper input would exhaust
    Python's recursion."""
    MAX_VALUES = 10_000
    """Values a study may hold once its aliases are expanded (the largest shipped study has about 150)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > self.MAX_DEPTH:
                raise yaml.constructor.ConstructorError(
                    None, None, f"line {event.start_mark.line + 1}: nested more than {self.MAX_DEPTH} levels deep; "
                    "a study needs a few", None)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(node, self.MAX_VALUES, self.MAX_DEPTH)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {short_repr(key, 60)} is written twice (lines {seen[key]} and {line}); keep "
                        "one (YAML would silently keep the last)", None)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class says so
                break
        return super().construct_mapping(node, deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root, max_values: int, max_depth: int) -> None:
    """Refuse a document whose aliases expand past `max_values` values or `max_depth` levels, or that contains
    itself. Sizes are summed over the node graph (each shared node once), so a billion laughs costs microseconds."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, depth) once expanded
    started: set[int] = set()  # begun, not finished: the ancestors of the node being walked
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            parts = [sizes[id(child)] for child in _children(node)]
            sizes[id(node)] = (1 + sum(v for v, _ in parts), 1 + max((d for _, d in parts), default=0))
            started.discard(id(node))
            continue
        if id(node) in sizes:
            continue
        line = node.start_mark.line + 1
        if id(node) in started:
            raise yaml.constructor.ConstructorError(
                None, None, f"line {line}: an alias refers to the value that contains it; write the values out", None)
        started.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    values, depth = sizes[id(root)]
    if values > max_values or depth > max_depth:
        raise yaml.constructor.ConstructorError(
            None, None, f"its anchors and aliases expand to {values:.3g} values {depth} levels deep (at most "
            f"{max_values:,} and {max_depth}); write the values out", None)


# YAML 1.2 reads `5e-5` and `1e9` as numbers; PyYAML (YAML 1.1) reads them as strings unless they have a dot,
# so `lr: 5e-5` was refused as "expected a number". Study files read them as numbers.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)"
                                                                         r"[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_yaml(text: str):
    """`text` parsed by `StrictLoader` (yaml.YAMLError when it is not valid, strict YAML)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """The first line of a YAML error, with its line number when PyYAML knows it, cut to a readable length."""
    text = str(getattr(exc, "problem", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    if mark is not None and not text.startswith("line "):
        text = f"line {mark.line + 1}: {text}"
    return text[:200]


def check_path_name(key: str, value: str) -> None:
    """A name that becomes a folder or file name: ASCII letters, digits, '-', '_', '.'; not '.' or '..' (or any
    name starting with '.': hidden, or a way up); at most `NAME_MAX` characters."""
    if (not value or len(value) > NAME_MAX or value.startswith(".") or not value.isascii()
            or not all(c.isalnum() or c in "-_." for c in value)):
        raise ConfigError(f"{key}={short_repr(value)}: it names folders and files, so use 1 to {NAME_MAX} ASCII "
                          "letters, digits, '-', '_' or '.' (not starting with '.')")


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
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
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
        raise ConfigError(f"--set {short_repr(item)}: expected KEY=VALUE, e.g. --set training.max_steps=20")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {short_repr(item)}: the value is not valid YAML ({yaml_problem(exc)})") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {short_repr(item)}: {part!r} is not a section")
    node[parts[-1]] = value


def as_list(value: Any, key: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{key}={short_repr(value)}: expected a list, got {type(value).__name__}")
    return value


def build_config(cls, raw: Any, where: str):
    """Build dataclass `cls` from a mapping, checking every key against the fields' type hints."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'study'}: expected a mapping, got {type(raw).__name__} ({short_repr(raw)})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = YAML_RENAMES.get(key, key) if isinstance(key, str) else key
        dotted = f"{where}.{short_repr(key, 60).strip(chr(39))}" if where else short_repr(key, 60).strip("'")
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
    """Check `value` against a field's type hint and the rules that follow from it (module docstring);
    convert lists to tuples and nested dicts to configs."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. int | dict[str, int]: the first alternative that accepts the value
            problems = []
            for alternative in inner:
                try:
                    return coerce(alternative, value, dotted)
                except ConfigError as exc:
                    problems.append(str(exc))
            typed = [p for p in problems if "expected " not in p]  # the right type, a bad value: say why
            if typed:
                raise ConfigError(typed[0])
            raise ConfigError(f"{dotted}={short_repr(value)}: expected one of "
                              f"{[getattr(a, '__name__', str(a)) for a in inner]}")
        return coerce(inner[0], value, dotted)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, dotted)
    if origin is tuple:
        if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
            value = [value]  # `tasks: paper10` means [paper10]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            items = tuple(coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
            _check_no_repeats(items, dotted)
            return items
        if len(value) != len(args):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected a list of {len(args)} values")
        return tuple(coerce(a, v, f"{dotted}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected a mapping")
        key_hint, value_hint = args
        return {coerce(key_hint, k, f"{dotted}.{k}"): coerce(value_hint, v, f"{dotted}.{short_repr(k, 60)}")
                for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected a number")
        return _check_number(float(value), dotted)
    if hint is int:
        if isinstance(value, float) and value.is_integer() and abs(value) <= NUMBER_MAX:
            value = int(value)  # `tokens: 2e8` is a whole number written as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected an integer")
        return _check_number(value, dotted)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected true or false")
        return value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and dotted.endswith("layers"):
            return str(value)  # `layers: 3` means block 3
        if isinstance(value, list) and dotted.endswith("layers"):
            value = ",".join(str(v) for v in value)  # `layers: [0, 3]` means blocks 0 and 3
        if not isinstance(value, str):
            raise ConfigError(f"{dotted}={short_repr(value)}: expected a string")
        if len(value) > TEXT_MAX:
            raise ConfigError(f"{dotted}={short_repr(value)}: {len(value):,} characters; at most {TEXT_MAX:,} "
                              "(a name, a path or a URI)")
        if _CONTROL.search(value):
            raise ConfigError(f"{dotted}={short_repr(value)}: contains a control character (a newline, tab or NUL); "
                              "remove it")
        return value
    return value


def _key_name(dotted: str) -> str:
    """`search.extra_seeds[2]` -> `extra_seeds`."""
    return re.sub(r"(\[\d+\])+$", "", dotted).rsplit(".", 1)[-1]


def _check_number(value: int | float, dotted: str) -> int | float:
    """Finite, >= 0 and at most NUMBER_MAX (SEED_MAX for a seed): what every consumer of a study number can use."""
    if not math.isfinite(value):
        raise ConfigError(f"{dotted}={value}: must be a finite number (.inf and .nan cannot train or be planned)")
    if value < 0:
        raise ConfigError(f"{dotted}={value}: must be >= 0 (no study key takes a negative number)")
    if _key_name(dotted) in SEED_KEYS:
        if value > SEED_MAX:
            raise ConfigError(f"{dotted}={value}: a seed must be in 0..{SEED_MAX} (numpy seeds the data order with it)")
    elif value > NUMBER_MAX:
        raise ConfigError(f"{dotted}={value:.4g}: more than {NUMBER_MAX:.0e}, which no study means; check the "
                          "number of digits")
    return value


def _check_no_repeats(items: tuple, dotted: str) -> None:
    """A list that names things (rungs, seeds, tasks, sources, search choices) names each once: a repeat would
    plan the same run twice under one config hash, or weigh a choice twice."""
    seen = set()
    for item in items:
        try:
            if item in seen:
                raise ConfigError(f"{dotted}: lists {short_repr(item, 60)} twice; give each once")
            seen.add(item)
        except TypeError:  # unhashable entries (none today) are checked by their owner
            return


def study_keys(cls, prefix: str = "") -> list[tuple[str, Any]]:
    """Every key of a study dataclass, recursively, as (dotted path with `[]` for list entries, type hint):
    what `coerce`'s rules cover and what the hostile-input test walks."""
    hints = typing.get_type_hints(cls)
    yaml_names = {field: key for key, field in YAML_RENAMES.items()}
    keys = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        dotted = f"{prefix}{yaml_names.get(item.name, item.name)}"
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        nested = next((a for a in options if dataclasses.is_dataclass(a)), None)
        listed = next((typing.get_args(a)[0] for a in options if typing.get_origin(a) is tuple
                       and dataclasses.is_dataclass(typing.get_args(a)[0])), None)
        if nested is not None:
            keys += study_keys(nested, dotted + ".")
        elif listed is not None:
            keys += study_keys(listed, dotted + "[].")
        else:
            keys.append((dotted, hint))
    return keys


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
