"""The root run config: composes the pillars' configs, loaded from a TOML recipe with
`--set section.key=value` overrides. It owns no settings of its own, and nothing changes it
once loaded: what a run resolves (vocabulary, tokenizer file, ranks) goes to resolved.json.

A recipe's `[data]` table may name a mixture spec file (`spec = "data/demo.toml"`); its other
keys override that file's (`seq_len = 256`, `backend.num_workers = 4`).

One path rule: a path written in a file is relative to that file's folder (the recipe's
`train.out_dir`, `model.path`, `data.spec` and `data.tokenizer`; the spec's `paths` and
`tokenizer`), and a path given on the command line (`--set train.out_dir=...`) is relative to
the working directory. Only the default `train.out_dir`, `runs/<recipe name>`, is relative to
the working directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slipstream.configfile import apply_overrides, build_config, load_toml, merge, parse_value
from slipstream.data.spec import MixtureSpec
from slipstream.models.config import GPTConfig, ModelConfig, model_config_from_raw
from slipstream.train.config import TrainConfig
from slipstream.train.distributed import ParallelConfig
from slipstream.train.optim import OptimConfig

SECTIONS = ("model", "data", "optim", "train", "parallel")
PATH_KEYS = ("train.out_dir", "model.path", "data.spec", "data.tokenizer")
"""The recipe's paths: each made absolute from the folder of the file that holds it, or from
the working directory when given on the command line."""


def absolute(value: Any, folder: Path) -> Any:
    """`value` as an absolute path from `folder`; names that are not paths stay as they are."""
    if not isinstance(value, str) or not value or value in ("byte", "model"):
        return value
    if value.startswith("pkg:"):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def _command_line_paths(overrides: list[str]) -> list[str]:
    """`--set` values of path keys, made absolute from the working directory."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in PATH_KEYS:
            item = f"{key}={json.dumps(absolute(parse_value(value), Path.cwd()))}"
        out.append(item)
    return out


def _file_paths(raw: dict, recipe_dir: Path) -> dict:
    """The recipe's own path keys, absolute from its folder (before any spec is merged)."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        table = raw.get(section)
        if isinstance(table, dict) and name in table:
            raw[section] = {**table, name: absolute(table[name], recipe_dir)}
    return raw


@dataclass(kw_only=True, slots=True, frozen=True)
class RunConfig:
    model: ModelConfig
    data: MixtureSpec
    optim: OptimConfig
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    recipe_dir: str = "."

    def __post_init__(self) -> None:
        if isinstance(self.model, GPTConfig) and self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"data.seq_len: {self.data.seq_len} is longer than model.max_seq_len "
                f"{self.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
            )

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        path = Path(path)
        recipe_dir = path.parent.resolve()
        overrides = _command_line_paths(list(overrides))
        # The mixture spec file is merged in first, so overrides reach its keys too
        # (`--set data.sources.0.weight=0.5`).
        first = [o for o in overrides if o.startswith("data.spec=")]
        raw = apply_overrides(_file_paths(load_toml(path), recipe_dir), first)
        data = dict(raw.get("data", {}))
        base_dir = recipe_dir
        if "spec" in data:
            spec_path = Path(data.pop("spec"))
            data = merge(load_toml(spec_path), data)
            base_dir = spec_path.parent.resolve()
        raw["data"] = data
        raw = apply_overrides(raw, [o for o in overrides if o not in first])
        train = dict(raw.get("train", {}))
        if not train.get("out_dir"):  # each recipe its own run folder: runs/<name>
            train["out_dir"] = str(Path("runs") / path.stem)
        raw["train"] = train
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}; use {list(SECTIONS)}")
        return cls(
            model=model_config_from_raw(raw.get("model", {}), "model"),
            data=MixtureSpec.from_dict(raw["data"], base_dir=str(base_dir)),
            optim=build_config(OptimConfig, raw.get("optim", {}), "optim"),
            train=build_config(TrainConfig, raw["train"], "train"),
            parallel=build_config(ParallelConfig, raw.get("parallel", {}), "parallel"),
            recipe_dir=str(recipe_dir),
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """A run's config.json back (`to_dict`'s output: its paths are resolved already)."""
        return cls(
            model=model_config_from_raw(raw["model"], "model"),
            data=MixtureSpec.from_dict(raw["data"]),  # its base_dir is in it
            optim=build_config(OptimConfig, raw["optim"], "optim"),
            train=build_config(TrainConfig, raw["train"], "train"),
            parallel=build_config(ParallelConfig, raw.get("parallel", {}), "parallel"),
            recipe_dir=raw.get("recipe_dir", "."),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "optim": self.optim.to_dict(),
            "train": self.train.to_dict(),
            "parallel": self.parallel.to_dict(),
            "recipe_dir": self.recipe_dir,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
