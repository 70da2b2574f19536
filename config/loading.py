"""Typed run configuration: TOML file + ``--set key=value`` overrides -> dataclasses.

Every section is a `dataclass(kw_only=True)`; unknown keys are errors that name the known ones
(a typo must not silently train the wrong model). Values given with --set are parsed as TOML
values (``--set optim.lr=1e-3``, ``--set model.moe.top_k=2``, ``--set data.path="/x"``),
falling back to a plain string.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def set_path(tree: dict, path: list[str], value: Any, what: str) -> dict:
    """tree[path[0]][path[1]]... = value, creating sections on the way."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {part!r} is a value, not a section")
    node[path[-1]] = value
    return tree


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        set_path(tree, path, value, f"--set {item!r}")
    return tree


def _dataclass_of(tp) -> type | None:
    """The dataclass inside an annotation like `X`, `X | None` or `Optional[X]`."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}


def _typed(value, hint, key: str):
    """`value` checked against the field's annotation (int, float, str, bool, X | None,
    tuple[str, ...], dict), with an int accepted for a float; ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):  # a table was expected (tables themselves are built by `build`)
        raise ConfigError(f"{key} must be a table of settings, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in _NAMES and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {_NAMES[hint]}, got {value!r} ({type(value).__name__})")
    return value


def build(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from a nested dict, recursively, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_of(hints[name])
        key = f"{where}.{name}" if where else name
        if sub is not None and isinstance(value, dict):
            value = build(sub, value, key)
        elif isinstance(value, list) and typing.get_origin(hints[name]) is list and \
                dataclasses.is_dataclass(typing.get_args(hints[name])[0]):
            value = [build(typing.get_args(hints[name])[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            value = _typed(value, hints[name], key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load(cls, path: str | None, overrides: list[str] | None = None):
    """`cls` from a TOML file (or defaults when `path` is None) plus overrides."""
    return build(cls, load_tree(path, overrides))


def load_tree(path: str | None, overrides: list[str] | None = None) -> dict:
    """The raw nested dict of a TOML file (or {}) with overrides applied."""
    tree: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                tree = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return apply_overrides(tree, overrides or [])
