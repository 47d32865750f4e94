"""One typed loader for every YAML file the project reads into dataclasses: run configs and reproduce grids.

A file is a YAML mapping whose keys are the fields of a ``@dataclass``; each value is checked against the
field's annotation and converted:

- ``bool``, ``int``, ``float`` (an int is accepted, and so is a string YAML did not read as a number, such
  as ``1e-4``), ``str``, ``Any``;
- ``Path`` (from a string), ``X | None`` (null), ``list[X]``, ``tuple[X, ...]`` and fixed ``tuple[X, Y]``
  (from YAML lists);
- a nested dataclass (from a mapping; null or absent: every default), ``dict[str, X]`` with X any of the
  above, a dataclass included (e.g. ``{size name: PretrainConfig}``).

Unknown keys, missing required keys, wrong types and the dataclass's own ``__post_init__`` checks (a
ConfigError, or a ValueError/TypeError) all become one-line ``ConfigError``s naming the dotted key
(``train.steps``, ``cells[0][1]``, ``sizes.tiny.n_layer``). ``key=value`` overrides use the same dotted
names; the key is checked against the fields before anything is built and the value is parsed as a YAML
scalar, then checked like any value of the file. Nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fdpg_scale.errors import ConfigError

__all__ = ["read_yaml", "load_dataclass", "apply_overrides", "build_section", "to_plain", "field_defaults"]

T = TypeVar("T")


def read_yaml(path: str | Path, what: str):
    """The parsed contents of YAML file ``path`` (None for an empty file); a one-line ConfigError naming
    ``what`` (``config``, ``grid``) when the file is missing, or the file when it is not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}: {' '.join(str(err).split())})") from None


def load_dataclass(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                   what: str = "config") -> T:
    """``cls`` built from the YAML mapping in ``path`` with the ``key=value`` ``overrides`` applied.

    what: the file's kind in the error for a missing file (``config``, ``grid``). Errors name the key, not
    the file: callers that read several files add the file's name (see ``experiments.grid.load_grid``)."""
    path = Path(path)
    raw = read_yaml(path, what)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {cls.__name__}'s keys, got {type(raw).__name__}")
    return build_section(cls, apply_overrides(cls, raw, overrides), prefix="")


def apply_overrides(cls: type, raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the raw mapping with each ``dotted.key=value`` set (the value parsed as a YAML scalar); a
    key that names no field of ``cls`` (or of its nested sections) is a ConfigError, before anything is built."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        _check_path(cls, parts, key)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = text
    return raw


def build_section(cls: type[T], raw: Any, prefix: str) -> T:
    """The dataclass ``cls`` from a plain mapping, checked as a section of a file is: unknown keys, missing
    required keys, wrong types and ``__post_init__``'s checks are ConfigErrors naming the key with ``prefix``
    (e.g. ``"train."``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r} (valid in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if not dataclasses.is_dataclass(hints[name]):
                raise ConfigError(f"missing required config key {key!r}")
            kwargs[name] = build_section(hints[name], {}, key + ".")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.')}: {err}" if prefix else str(err)) from None


def to_plain(obj: Any) -> Any:
    """A dataclass (or any value of the types above) as plain YAML/JSON data: mappings, lists, strings for
    paths; what ``build_section`` reads back to an equal object."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------- internals


def field_defaults(cls: type) -> dict[str, Any]:
    """{field: default} of a dataclass, as plain values (``to_plain``), for the fields that have one."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_plain(f.default_factory())
    return out


def _check_path(cls: type, parts: list[str], key: str) -> None:
    """Reject an override whose dotted key names no field (before anything is built)."""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r} "
                              f"(valid: {', '.join(sorted(fields))})")
        hint = _strip_optional(typing.get_type_hints(cls)[part])
        if dataclasses.is_dataclass(hint):
            cls = hint
        elif i < len(parts) - 1:
            if typing.get_origin(hint) is dict:
                return  # a mapping (e.g. target.scorer_args.substring): its keys are free
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")


def _strip_optional(hint):
    """``X`` of ``X | None``; any other annotation unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the annotation ``hint`` and converted (see the module docstring)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key {key!r}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        return build_section(hint, {} if value is None else value, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, key_hint, f"{key}: the key {k!r}"): _coerce(v, value_hint, f"{key}.{k}")
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r} must be a list of {len(args)} items "
                              f"({', '.join(map(_name, args))}), got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"config key {key!r} must be a number, got nan")
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:  # pragma: no cover - a field type this loader does not know is a bug in the dataclass
        raise TypeError(f"config key {key!r}: unsupported annotation {hint!r}")
    raise ConfigError(f"config key {key!r} must be of type {_name(hint)}, got {value!r} "
                      f"({type(value).__name__})")


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}
