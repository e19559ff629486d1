"""`slipstream init NAME --data PATH [--data PATH ...]`: a recipe and its mixture spec for your
own files, in one command: NAME.toml (the run) and NAME.data.toml (the sources), plus a
byte-level BPE trained on the data (NAME.tokenizer.json) unless `--tokenizer` names one.

Each `--data` (a file, a folder or a glob, relative to the working directory) is one source:
named after its folder or file, its format read from the file names, weighted by its size in
bytes (the natural mixture; edit the weights to change it). The paths are written relative to
the spec's folder (paths in a file are relative to that file). The shards are then indexed
and their tokens counted with a progress bar, so the first `slipstream train` starts at once.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slipstream.data.sources import JsonlFormat, ParquetFormat, TextFormat
from slipstream.data.sources.base import list_shards

SUFFIXES = {
    "jsonl": JsonlFormat.suffixes,
    "parquet": ParquetFormat.suffixes,
    "text": TextFormat.suffixes,
}


def init_run(
    name: str,
    data: list[str],
    *,
    tokenizer: str = "train",
    vocab_size: int = 8192,
    text_field: str = "text",
    force: bool = False,
    console: Console | None = None,
) -> Path:
    """Write the recipe, the spec (and the tokenizer); returns the recipe's path."""
    console = console or Console()
    if not data:
        raise ValueError("--data: name at least one file, folder or glob of your documents")
    recipe = Path(name if name.endswith(".toml") else f"{name}.toml")
    stem = recipe.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem):
        raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' for the run's name")
    folder = recipe.parent.resolve()
    spec_path, tok_path = folder / f"{stem}.data.toml", folder / f"{stem}.tokenizer.json"
    written = [recipe, spec_path] + ([tok_path] if tokenizer == "train" else [])
    there = [str(p) for p in written if p.exists()]
    if there and not force:
        raise ValueError(f"{', '.join(there)} exist; choose another name, or pass --force")
    sources = [_source(d, folder, text_field) for d in data]
    _unique_names(sources)
    if tokenizer not in ("train", "byte"):
        tok_file = Path(tokenizer).expanduser().resolve()
        if not tok_file.is_file():
            raise ValueError(f"--tokenizer: {tokenizer} is not a file; give a tokenizers JSON file")
        tokenizer = os.path.relpath(tok_file, folder)
    folder.mkdir(parents=True, exist_ok=True)
    kept = {p: p.read_bytes() for p in written if p.is_file()}  # what --force replaces
    try:  # nothing half-made stays behind: a mistake on the way puts back what was there
        spec_text = _spec_text(sources, "byte" if tokenizer == "train" else tokenizer)
        spec_path.write_text(spec_text)
        if tokenizer == "train":
            _train_tokenizer(spec_path, tok_path, vocab_size, console)
            spec_text = spec_text.replace('tokenizer = "byte"', f'tokenizer = "{tok_path.name}"')
            spec_path.write_text(spec_text)
        recipe.write_text(_recipe_text(stem, spec_path.name))
        _count_tokens(recipe, console)
    except BaseException:
        for p in written:
            if p in kept:
                p.write_bytes(kept[p])
            else:
                p.unlink(missing_ok=True)
        raise
    return recipe


def _source(pattern: str, folder: Path, text_field: str) -> dict:
    files = _files(pattern)
    fmts = {f for f in map(_format_of, files) if f}
    if len(fmts) > 1:
        raise ValueError(
            f"--data {pattern!r}: holds files of several formats ({', '.join(sorted(fmts))}); "
            "give each its own --data, such as 'folder/*.jsonl'"
        )
    fmt = fmts.pop()
    given = Path(os.path.abspath(Path(pattern).expanduser()))  # a glob stays a glob
    if glob.has_magic(pattern):
        first = next(i for i, p in enumerate(given.parts) if glob.has_magic(p))
        named = Path(*given.parts[:first]).name
    else:
        named = given.name if given.is_dir() else given.name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", named).strip("-") or "data"
    size = sum(os.path.getsize(f) for f in files)
    src = {"name": name, "format": fmt, "paths": [os.path.relpath(given, folder)], "bytes": size}
    if fmt != "text":
        src["text_field"] = text_field
    return src


def _files(pattern: str) -> list[str]:
    """The files of documents `pattern` stands for (a folder: those with a known suffix)."""
    every = tuple(s for group in SUFFIXES.values() for s in group)
    try:
        found = list_shards(
            [pattern], lambda p: os.path.abspath(os.path.expanduser(p)), "--data", every
        )
    except ValueError:
        found = []
    found = [f for f in found if _format_of(f)]
    if not found:
        raise ValueError(
            f"--data {pattern!r}: no file of documents there (.jsonl, .jsonl.gz, .jsonl.zst, "
            ".parquet, .txt, .md); check the path (relative to the working directory)"
        )
    return found


def _format_of(path: str) -> str | None:
    return next((fmt for fmt, suffixes in SUFFIXES.items() if path.endswith(suffixes)), None)


def _unique_names(sources: list[dict]) -> None:
    seen: dict[str, int] = {}
    for s in sources:
        n = seen[s["name"]] = seen.get(s["name"], 0) + 1
        if n > 1:
            s["name"] = f"{s['name']}-{n}"


def _spec_text(sources: list[dict], tokenizer: str) -> str:
    total = sum(s["bytes"] for s in sources) or 1
    lines = [
        "# The mixture: one [[sources]] table per source. Paths are relative to this file;",
        "# a folder stands for the files of its format in it. Weights are relative (here: each",
        "# source's share of the bytes); every key: docs/reference.md.",
        f'tokenizer = "{tokenizer}"',
        "seq_len = 256",
        "micro_batch_size = 8",
        "num_micro_batches = 1",
        "holdout_fraction = 0.01",
        "",
    ]
    for s in sources:
        lines += ["[[sources]]", f'name = "{s["name"]}"', f'format = "{s["format"]}"',
                  f"paths = {json.dumps(s['paths'])}"]  # fmt: skip
        if "text_field" in s:
            lines.append(f'text_field = "{s["text_field"]}"')
        if s["format"] == "text":
            lines.append(
                '# separator = "\\n\\n"   # split files into documents; default one per file'
            )
        lines += [f"weight = {s['bytes'] / total:.4f}", ""]
    return "\n".join(lines)


def _recipe_text(stem: str, spec_name: str) -> str:
    return f"""# A run on your own data: `slipstream train {stem}.toml` (out_dir: runs/{stem}).
# Paths are relative to this file. Every key: docs/reference.md.

[model]                 # a small GPT; raise these for a real run (`slipstream memory` sizes it)
n_layer = 4
n_head = 4
d_model = 256
max_seq_len = 256

[data]
spec = "{spec_name}"

[optim]
lr = 1e-3
warmup_steps = 20

[train]
steps = 200
eval_every = 50
checkpoint_every = 50
"""


def _train_tokenizer(spec_path: Path, out: Path, vocab_size: int, console: Console) -> None:
    from slipstream.data.spec import MixtureSpec
    from slipstream.tools.tokenizer import mixture_texts, train_bpe

    spec = MixtureSpec.from_toml(spec_path)
    with console.status(f"training a {vocab_size:,}-token BPE on up to 20,000 documents"):
        tok = train_bpe(mixture_texts(spec, 20_000), out, vocab_size)
    console.print(f"tokenizer: {out.name} (vocab {tok.vocab_size:,})", markup=False)


def _count_tokens(recipe: Path, console: Console) -> None:
    """Index every shard and count its tokens now (cached), with a bar: the first train
    then starts at once."""
    from slipstream.config import RunConfig
    from slipstream.data.sources.loader import build_source_loaders

    spec = RunConfig.load(recipe).data
    loaders = build_source_loaders(spec)
    shards = [(ldr, i) for ldr in loaders for i in range(len(ldr.shards))]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("counting tokens, shard by shard", total=len(shards))
        tokens = {ldr.name: 0 for ldr in loaders}
        for ldr, i in shards:
            tokens[ldr.name] += int(ldr.shard_lengths(i).sum())
            bar.advance(task)
    for ldr in loaders:
        console.print(
            f"source {ldr.name!r}: {ldr.num_docs:,} documents, {tokens[ldr.name]:,} tokens "
            f"in {len(ldr.shards)} file(s)"
            + (f", {ldr.num_bad:,} corrupt record(s) skipped" if ldr.num_bad else ""),
            markup=False,
        )
        ldr.close()
