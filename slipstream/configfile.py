"""TOML files for every config: loading, `--set section.key=value` overrides, and one builder,
`build_config`, that turns a table into a (nested) config dataclass. Unknown keys are refused
and every value is checked against its field's type here, once, so each config only validates
what its types cannot say. Also the check of a versioned `state_dict`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Union


def parse_value(text: str) -> Any:
    """A TOML value (`8`, `1e-3`, `true`, `"x"`, `[1, 2]`); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict: `balance.method=kk`, `sources.0.weight=0.5`."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set seq_len=1024")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_index(part, node, key)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = parse_value(value)
        elif isinstance(node, dict):
            node[last] = parse_value(value)
        else:
            raise ValueError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a table")
    return raw


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"--set {key}: {part!r} is not an index below {len(node)}")
    return int(part)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found; check the path")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, tables merged key by key (lists are replaced whole)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- building config dataclasses --------------------------------------------------------------
def build_config(cls: type, raw: Any, where: str, **extra: Any) -> Any:
    """`cls(**raw, **extra)` with nested dataclasses built too. A key `cls` does not have, or a
    value not of its field's type, raises ValueError naming the key, the value and the type.

    A class may define `from_raw(raw, where)` (a classmethod) to accept another shape, e.g. a
    schedule written as a list of `[step, weight]` pairs; it is used wherever the class is a
    field's type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: convert(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs, **extra)


def convert(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp`, or ValueError. ints pass as floats; nothing else is coerced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no {tp}")
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "from_raw"):
            return tp.from_raw(value, where)
        return build_config(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: {value!r} is not a list")
        return [convert(v, args[0], f"{where}.{i}") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {value!r} is not a table")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not {_name(tp)}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: {value!r} is not {_name(tp)}")
    return value


def _name(tp: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


# -- versioned state --------------------------------------------------------------------------
VERSION_KEY = "version"


def check_version(state: dict, expected: int, what: str) -> None:
    """Refuse a `state_dict` written by another format version, naming what it belongs to."""
    got = state.get(VERSION_KEY) if isinstance(state, dict) else None
    if got != expected:
        raise ValueError(
            f"{what}: state version {got!r} is not {expected}; it was written by another "
            "Slipstream version"
        )
