"""`longtrain config show CONFIG [--set k=v] [--json]`: the run a config resolves to, every key
included (defaults, an `init_from = "hf:..."` architecture), as TOML that loads back to the same
run, or as JSON. `longtrain config schema [--json]`: every key with its type, default and what
it means, read from the typed configs themselves."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import types
import typing

BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain config", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = ap.add_subparsers(dest="what", required=True)
    show = sub.add_parser("show", help="the resolved config: every key, as TOML (or --json)")
    show.add_argument("config", nargs="?", help="TOML file (omit for the defaults)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--json", action="store_true")
    schema = sub.add_parser("schema", help="every key: type, default, description")
    schema.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from longtrain.config.loading import ConfigError

    try:
        if args.what == "show":
            cfg = resolved(args.config, args.overrides)
            print(json.dumps(dataclasses.asdict(cfg), indent=1) if args.json else to_toml(cfg), end="\n" if args.json else "")
        else:
            rows = schema_rows()
            print(json.dumps(rows, indent=1) if args.json else _schema_text(rows))
    except (ConfigError, ValueError) as e:
        print(f"longtrain config: {e}", file=sys.stderr)
        return 2
    return 0


def resolved(path: str | None, overrides: list[str]):
    """The `TrainConfig` `longtrain train` would run (its stages kept as written)."""
    from longtrain.config.hf import with_hf_model
    from longtrain.config.loading import build, load_tree
    from longtrain.config.train import TrainConfig

    return build(TrainConfig, with_hf_model(load_tree(path, overrides)))


# ---------------------------------------------------------------- TOML out
def _key(k: str) -> str:
    return k if BARE.match(k) else json.dumps(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # Python writes inf, -inf and nan as TOML does
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    if dataclasses.is_dataclass(v):
        return _value({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
    raise TypeError(f"cannot write {v!r} as TOML")


def _table(obj, name: str, out: list[str]) -> None:
    """`obj`'s plain keys under [name], then its sub-tables (dataclass fields) as [name.field]."""
    plain, tables = [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            tables.append((f.name, v))
        elif isinstance(v, list) and v and all(dataclasses.is_dataclass(x) for x in v):
            tables.append((f.name, v))
        elif v is None:
            plain.append(f"# {_key(f.name)}: not set")
        else:
            plain.append(f"{_key(f.name)} = {_value(v)}")
    if name:
        out.append(f"\n[{name}]")
    out.extend(plain)
    for key, v in tables:
        path = f"{name}.{_key(key)}" if name else _key(key)
        if isinstance(v, list):  # an array of tables ([[stages]])
            for item in v:
                out.append(f"\n[[{path}]]")
                out.extend(f"{_key(f.name)} = {_value(getattr(item, f.name))}" for f in dataclasses.fields(item)
                           if getattr(item, f.name) is not None)
        else:
            _table(v, path, out)


def to_toml(cfg) -> str:
    """`cfg` (a config dataclass) as TOML that `config.loading.build` reads back to an equal one."""
    out: list[str] = []
    _table(cfg, "", out)
    return "\n".join(out).lstrip("\n") + "\n"


# ---------------------------------------------------------------- schema
def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if hint is type(None):
        return "none"
    if dataclasses.is_dataclass(hint):
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean", dict: "table"}.get(hint, str(hint))


def _comments(cls) -> dict[str, str]:
    """Each field's comment in `cls`'s source: the one on its line, else the lines just above."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        s = line.strip()
        m = re.match(r"^(\w+)\s*:\s*[^=#]+?(?:=\s*(.*?))?\s*(?:#\s*(.*))?$", s) if line.startswith("    ") and \
            not line.startswith("     ") else None
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
        elif m and not s.startswith(("def ", "return")):
            out[m.group(1)] = m.group(3) or " ".join(above)
            above = []
        else:
            above = []
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def schema_rows(cls=None, prefix: str = "") -> list[dict]:
    """Every key of the run config (nested tables flattened to dotted keys): key, type,
    default, description."""
    from longtrain.config.loading import _dataclass_of

    if cls is None:
        from longtrain.config.train import TrainConfig

        cls = TrainConfig
    hints, notes, rows = typing.get_type_hints(cls), _comments(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, sub = f"{prefix}{f.name}", _dataclass_of(hints[f.name])
        default = _default(f)
        if sub is not None and typing.get_origin(hints[f.name]) is not list:
            doc = (sub.__doc__ or "").split("\n")[0]
            doc = "" if doc.startswith(sub.__name__ + "(") else doc  # dataclass's generated signature
            plain = None if dataclasses.is_dataclass(default) else default  # a number also allowed, or None
            rows.append({"key": key, "type": _type_name(hints[f.name]), "default": plain,
                         "description": notes.get(f.name) or doc})
            rows.extend(schema_rows(sub, key + "."))
            continue
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [dataclasses.asdict(d) for d in default]
        rows.append({"key": key, "type": _type_name(hints[f.name]), "default": default,
                     "description": notes.get(f.name, "")})
    return rows


def _schema_text(rows: list[dict]) -> str:
    width = max(len(r["key"]) for r in rows)
    out = []
    for r in rows:
        default = "" if r["default"] is None else f" = {json.dumps(r['default'])}"
        out.append(f"{r['key']:<{width}}  {r['type']}{default}")
        if r["description"]:
            out.append(f"{'':<{width}}    {r['description']}")
    return "\n".join(out)
