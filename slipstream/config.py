"""TOML loading and `--set section.key=value` overrides shared by every command. The root
training config (composing the pillars' configs) is built on these."""

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
