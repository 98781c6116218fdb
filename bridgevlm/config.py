"""Typed dataclass configs loaded from YAML, with dotted command-line overrides.

A config is a tree of dataclasses. ``load_config`` reads a YAML file, applies overrides such as
``train.lr=1e-4`` on top, and builds the dataclass tree, checking every value against the field's
type annotation. Every problem raises :class:`ConfigError`, whose message starts with where the bad
value came from (the file path, or the exact command-line override) and names the dotted field.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from .io import atomic_write_text

T = TypeVar("T")

# One step in a field path: a field/dict key, or a list index.
_Part = Union[str, int]
_Parts = tuple[_Part, ...]


class ConfigError(ValueError):
    """A config value is missing, unknown, malformed or of the wrong type.

    ``source`` is where the value came from (a file path, a command-line override, ...) and
    ``field`` the dotted path of the offending field, when known.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        super().__init__(message)
        self.source = source
        self.field = field


class _Invalid(Exception):
    """Internal: a value at ``parts`` is invalid. Turned into a ConfigError once the source is known."""

    def __init__(self, parts: _Parts, message: str):
        super().__init__(message)
        self.parts = parts
        self.message = message


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data
# --------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking every value against its field type.

    Supported field types: int, float, str, bool, Path, ``Optional[X]`` / ``X | None``, other unions,
    ``list[X]``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``dict[K, V]``, ``Literal[...]``, nested
    dataclasses and ``Any``. Missing fields take their dataclass defaults. An int is accepted for a
    float field, and so is a string that parses as a float (PyYAML reads ``1e-4`` as a string);
    a bool is never accepted as a number, nor a number as a string.

    Raises:
        ConfigError: on an unknown, missing or ill-typed field; the message starts with ``source``.
        TypeError: if ``cls`` is not a dataclass or uses an unsupported field type (a code bug).
    """
    return _build(cls, data, lambda parts: source)


def _build(cls: type[T], data: Any, source_for: Callable[[_Parts], str]) -> T:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    try:
        return _to_dataclass(cls, data, (), strict=False)
    except _Invalid as err:
        source = source_for(err.parts)
        raise ConfigError(f"{source}: {err.message}", source=source, field=_dotted(err.parts)) from None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as err:
        # Typical with `from __future__ import annotations` and a dataclass defined inside a function.
        raise TypeError(
            f"cannot resolve the type annotations of {cls.__qualname__}: {err}; "
            "define config dataclasses (and the types they use) at module level"
        ) from None


def _to_dataclass(cls: type, data: Any, parts: _Parts, strict: bool) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        where = f"field '{_dotted(parts)}' expects" if parts else "config must be"
        raise _Invalid(parts, f"{where} a mapping of {cls.__name__} fields, got {_show(data)}")
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in init_fields]
    for key in data:
        if key not in names:
            owner = _dotted(parts) if parts else cls.__name__
            message = f"unknown field '{_dotted(parts + (key,))}'; valid fields of {owner}: {', '.join(names)}"
            close = difflib.get_close_matches(str(key), names, n=1)
            if close:
                message += f" (did you mean '{close[0]}'?)"
            raise _Invalid(parts + (key,), message)
    hints = _type_hints(cls)
    kwargs = {}
    for f in init_fields:
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], parts + (f.name,), strict)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(parts + (f.name,), f"missing required field '{_dotted(parts + (f.name,))}'")
    try:
        return cls(**kwargs)
    except ValueError as err:  # a __post_init__ check, e.g. a cross-field constraint
        where = f"'{_dotted(parts)}'" if parts else cls.__name__
        raise _Invalid(parts, f"invalid {where}: {err}") from None


def _convert(tp: Any, value: Any, parts: _Parts, strict: bool) -> Any:
    """Check/convert ``value`` against annotation ``tp``. ``strict`` disables int->float and str->float."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _convert_union(tp, value, parts, strict)
    if origin is Literal:
        for option in typing.get_args(tp):
            # Compare types too: True == 1, and a YAML `yes` must not match Literal[1].
            if type(option) is type(value) and option == value:
                return option
        raise _Invalid(parts, f"field '{_dotted(parts)}' must be one of {_describe(tp)}, got {_show(value)}"
                       + _quote_hint(tp, value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, parts, strict)
    if tp in (list, tuple, dict) or origin in (list, tuple, dict, Sequence, Mapping):
        return _convert_container(tp, origin or tp, value, parts, strict)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, float):
            return value
        if not strict and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not strict and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
    else:
        raise TypeError(f"unsupported config field type {tp!r} for field '{_dotted(parts)}'")
    raise _Invalid(parts, f"field '{_dotted(parts)}' expects {_describe(tp)}, got {_show(value)}"
                   + _quote_hint(tp, value))


def _convert_union(tp: Any, value: Any, parts: _Parts, strict: bool) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:  # Optional[X]: report X's own (possibly deeper) error
        return _convert(members[0], value, parts, strict)
    errors: list[_Invalid] = []
    # An exact match wins over a lenient conversion, so `float | str` keeps "abc" a str and 3 -> 3.0.
    for attempt_strict in (True,) if strict else (True, False):
        for member in members:
            try:
                return _convert(member, value, parts, attempt_strict)
            except _Invalid as err:
                errors.append(err)
    deeper = [e for e in errors if len(e.parts) > len(parts)]
    if deeper:  # the value had the right shape for some member; its inner error is the useful one
        raise deeper[0]
    raise _Invalid(parts, f"field '{_dotted(parts)}' expects {_describe(tp)}, got {_show(value)}")


def _convert_container(tp: Any, origin: Any, value: Any, parts: _Parts, strict: bool) -> Any:
    args = typing.get_args(tp)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Invalid(parts, f"field '{_dotted(parts)}' expects {_describe(tp)}, got {_show(value)}")
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, parts + (k,), strict): _convert(value_tp, v, parts + (k,), strict)
            for k, v in value.items()
        }
    if not isinstance(value, (list, tuple)):
        raise _Invalid(parts, f"field '{_dotted(parts)}' expects {_describe(tp)}, got {_show(value)}")
    if origin in (list, Sequence):
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, parts + (i,), strict) for i, v in enumerate(value)]
    # tuple: tuple[X, ...] (variable length), tuple[X, Y] (fixed), bare tuple
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, parts + (i,), strict) for i, v in enumerate(value))
    if args == ((),):  # tuple[()]
        args = ()
    if len(value) != len(args):
        raise _Invalid(parts, f"field '{_dotted(parts)}' expects {_describe(tp)} ({len(args)} items), "
                              f"got {len(value)} items: {_show(value)}")
    return tuple(_convert(a, v, parts + (i,), strict) for i, (a, v) in enumerate(zip(args, value)))


def _describe(tp: Any) -> str:
    """A short human-readable name for a type annotation, for error messages."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_describe(a) for a in args)
    if origin is Literal:
        return ", ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _describe(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _quote_hint(tp: Any, value: Any) -> str:
    # YAML silently turns `no`, `on`, `1.10` or `2024-01-01` into non-strings; say how to keep a string.
    wants_str = tp is str or any(isinstance(a, str) for a in typing.get_args(tp))
    if wants_str and value is not None and not isinstance(value, (str, list, tuple, Mapping)):
        return "; quote the value to keep it a string"
    return ""


def _dotted(parts: _Parts) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# --------------------------------------------------------------------------------------------
# Dataclasses back to plain data, overrides, merging
# --------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> dict:
    """Convert a dataclass instance to a plain dict of YAML-safe values (Path -> str, tuple -> list).

    Only ``init`` fields are included, so the result loads back with :func:`from_dict`.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["train.lr=1e-4", "model.layers=[1,2]"]`` into a nested dict.

    Values are parsed with ``yaml.safe_load`` (so ``3`` is an int, ``[1,2]`` a list, ``null`` None and
    an empty value None). A value that is not valid YAML is kept as the raw string, unless it starts
    with ``[`` or ``{`` (clearly meant as a list/mapping). Later items win over earlier ones.
    """
    result: dict = {}
    for item in overrides:
        keys, value = _parse_override(item)
        result = merge(result, _nest(keys, value))
    return result


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    source = f"command line override '{item}'"
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{source}: expected KEY=VALUE, e.g. train.lr=1e-4", source=source)
    key, raw = item.split("=", 1)
    keys = tuple(k.strip() for k in key.split("."))
    if not all(keys):
        raise ConfigError(f"{source}: malformed key '{key}'; expected dotted field names like train.lr",
                          source=source)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        if raw.lstrip().startswith(("[", "{")):
            problem = getattr(err, "problem", None) or err
            raise ConfigError(f"{source}: value is not valid YAML: {problem}", source=source) from None
        value = raw  # free text such as `prompt=Q: what is it?`
    return keys, value


def _nest(keys: Sequence[str], value: Any) -> dict:
    for key in reversed(keys[1:]):
        value = {key: value}
    return {keys[0]: value}


def merge(base: Mapping, update: Mapping) -> dict:
    """Deep-merge ``update`` into ``base`` and return a new dict; neither input is modified.

    Nested mappings merge key by key; any other value in ``update`` (lists included) replaces the
    one in ``base``, except a mapping whose keys are all list indices (``stages.1.train.lr=...``),
    which updates those elements of a list.
    """
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), list) and value \
                and all(str(k).isdigit() for k in value):
            items = out[key]
            for index, element in value.items():
                if int(index) >= len(items):
                    raise ConfigError(f"'{key}.{index}': index out of range, '{key}' has {len(items)} item(s)",
                                      field=f"{key}.{index}")
                both = isinstance(element, Mapping) and isinstance(items[int(index)], Mapping)
                items[int(index)] = merge(items[int(index)], element) if both else copy.deepcopy(element)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently (last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may legitimately repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = seen.get(key)
            except TypeError:  # unhashable key: let the base class report it
                continue
            if first_line is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined on line {first_line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML file whose top level is a mapping (an empty file gives ``{}``).

    Raises:
        ConfigError: if the file is missing or unreadable, is not valid YAML (the message gives
            ``path:line:column``), repeats a key, or its top level is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}", source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {err.problem or err}", source=str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config fields, "
                          f"got {type(data).__name__}", source=str(path))
    return data


EXTENDS_KEY = "extends"


def load_layered_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file merged over the file its top-level `extends:` names (a path relative to it),
    recursively, so a variant recipe states only what it changes. Lists replace the parent's whole,
    unless given as a mapping of indices (`stages: {1: {...}}`), as with command-line overrides."""
    path = Path(path)
    data = load_yaml(path)
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' must be the path of another config file, got {_show(parent)}",
                          source=str(path), field=EXTENDS_KEY)
    parent_path = (path.parent / parent).resolve()
    chain = _chain + (path.resolve(),)
    if parent_path in chain:
        loop = " -> ".join(str(p) for p in (*chain, parent_path))
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' makes a loop: {loop}", source=str(path), field=EXTENDS_KEY)
    if not parent_path.is_file():
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' names {parent_path}, which does not exist",
                          source=str(path), field=EXTENDS_KEY)
    return merge(load_layered_yaml(parent_path, chain), data)


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    base: Mapping | None = None,
    skip_keys: Sequence[str] = (),
) -> T:
    """Build config ``cls`` from ``base`` (defaults), then the YAML file ``path`` (over the file it
    ``extends``, if any), then ``overrides``.

    ``skip_keys`` are top-level keys of the file that are not part of ``cls`` (e.g. a recipe's ``task``).

    Each layer deep-merges over the previous one. An error names the layer the bad value came
    from: ``command line override 'train.lrr=1'``, the file path, or ``base config``.
    """
    file_data = load_layered_yaml(path) if path is not None else {}
    file_data = {k: v for k, v in file_data.items() if k not in skip_keys}
    parsed = [(item, *_parse_override(item)) for item in overrides]
    data = merge(base or {}, file_data)
    for _, keys, value in parsed:
        data = merge(data, _nest(keys, value))

    def source_for(parts: _Parts) -> str:
        for item, keys, value in reversed(parsed):  # the last override touching a field set it
            if _provides(keys, value, parts):
                return f"command line override '{item}'"
        if path is not None and _provides((), file_data, parts):
            return str(path)
        if base and _provides((), base, parts):
            return "base config"
        # Nobody set it (a missing required field): point at where it should be added.
        return str(path) if path is not None else "command line"

    return _build(cls, data, source_for)


def _provides(keys: Sequence[str], value: Any, parts: _Parts) -> bool:
    """Whether a layer that sets ``keys`` to ``value`` supplied the config value at ``parts``."""
    # A list index is an int in `parts` but a string in an override's keys (`stages.0.name=...`).
    n = min(len(keys), len(parts))
    if tuple(map(str, keys[:n])) != tuple(map(str, parts[:n])):
        return False
    node = value
    for part in parts[len(keys):]:
        if not isinstance(node, Mapping):  # a list or scalar replaced everything beneath it
            return True
        key = part if part in node else str(part)
        if key not in node:
            return False
        node = node[key]
    return True


def follow_fields(cfg: T, section: str, derived: Mapping[str, tuple[Any, str]]) -> T:
    """`cfg` with the fields in `derived` (name -> (value, what decides it)) filled in. A field set
    to neither its default nor the derived value is a mistake, named rather than overwritten."""
    defaults = type(cfg)()
    for name, (value, reason) in derived.items():
        given = getattr(cfg, name)
        if given != value and given != getattr(defaults, name):
            raise ValueError(f"{section}.{name} is {given}, but it follows {reason} ({value}); leave it unset")
    return dataclasses.replace(cfg, **{name: value for name, (value, _) in derived.items()})


def save_config(obj_or_dict: Any, path: str | os.PathLike) -> None:
    """Write a config (dataclass instance or mapping) as YAML, atomically.

    The YAML goes to a temporary file in the same directory, which then replaces ``path``, so a
    crash never leaves a half-written config. Field order is kept (``sort_keys=False``).
    """
    if dataclasses.is_dataclass(obj_or_dict) and not isinstance(obj_or_dict, type):
        data = to_dict(obj_or_dict)
    elif isinstance(obj_or_dict, Mapping):
        data = _plain(obj_or_dict)
    else:
        raise TypeError(f"save_config expects a dataclass instance or a mapping, got {type(obj_or_dict).__name__}")
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
