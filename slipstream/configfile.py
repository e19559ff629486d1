"""TOML files for every config: loading, `--set section.key=value` overrides, and building a
config dataclass from a table with errors that name unknown keys. The pillars' configs and the
root run config (`slipstream.config`) are built with these."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


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


def build_section(cls: type, raw: Any, where: str, **extra: Any) -> Any:
    """`cls(**raw, **extra)`, refusing keys `cls` does not have, with the known ones listed."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table, got {raw!r}")
    known = set(cls.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**raw, **extra)


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, tables merged key by key (lists are replaced whole)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
