"""Loader worker processes do not import the trainer's main module (and so not torch)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT, corpus_spec

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import psutil
    import torch  # a trainer's main module imports torch

    from slipstream.data import MixtureSpec
    from slipstream.data.backends.inline import InlineBackend
    from slipstream.data.backends.local import LocalBackend
    from slipstream.data.sources.loader import build_source_loaders

    spec = MixtureSpec.from_dict(json.loads(sys.argv[1]), base_dir=sys.argv[2])
    pool = LocalBackend(spec)
    ids = [0, 3, 4]
    got = [t.result() for t in [pool.submit(s, ids) for s in range(3)]]
    ref = InlineBackend(build_source_loaders(spec, spec.tokenizer))
    want = [ref.submit(s, ids).result() for s in range(3)]
    same = all(
        len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))
        for a, b in zip(got, want)
    )
    maps = {}
    for pid in pool.worker_pids():
        paths = {m.path for m in psutil.Process(pid).memory_maps()}
        maps[pid] = sorted(p for p in paths if "torch" in p)
    worker_env = pool._pool.submit(os.getenv, "TOKENIZERS_PARALLELISM").result()
    pool.close()
    print(json.dumps({
        "same": same, "maps": maps, "main_has_torch": "torch" in sys.modules,
        "worker_env": worker_env, "main_env": os.getenv("TOKENIZERS_PARALLELISM"),
    }))
    """
)


def process_pool_spec(tmp_path) -> dict:
    raw = corpus_spec(tmp_path, "jsonl")
    raw["backend"]["pool"] = "process"
    return raw


def run_script(tmp_path, text: str, raw: dict):
    """Runs `text` as a main script (argv: the spec, its folder); its last line, as JSON."""
    script = tmp_path / "main_script.py"
    script.write_text(text)
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(raw), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_process_pool_workers_leave_out_the_main_module(tmp_path):
    """...and tokenize on their own thread (not a thread per core), while the trainer's own
    process keeps the user's tokenizers setting."""
    res = run_script(tmp_path, SCRIPT, process_pool_spec(tmp_path))
    assert res["main_has_torch"] and res["same"]
    assert res["worker_env"] == "false" and res["main_env"] is None
    assert res["maps"], "the pool started no worker process"
    for pid, paths in res["maps"].items():
        assert not paths, f"worker {pid} maps torch: {paths}"


MAIN_TRANSFORM = textwrap.dedent(
    """
    import json, sys

    from slipstream.data import MixtureSpec
    from slipstream.data.backends.local import LocalBackend

    def shout(text):
        return text.upper()

    if __name__ == "__main__":
        raw = json.loads(sys.argv[1])
        raw["sources"][0]["transform"] = "__main__:shout"
        pool = LocalBackend(MixtureSpec.from_dict(raw, base_dir=sys.argv[2]))
        tokens = pool.submit(0, [0, 1]).result()
        pool.close()
        print(json.dumps([t.tolist() for t in tokens]))
    """
)


def test_a_transform_in_the_main_module_still_runs_in_workers(tmp_path):
    """A source whose transform is defined in the trainer's script: its workers import the
    script (plain spawn), and the transform applies."""
    raw = process_pool_spec(tmp_path)
    got = run_script(tmp_path, MAIN_TRANSFORM, raw)

    from slipstream.data import MixtureSpec
    from slipstream.data.sources.loader import build_source_loaders

    raw["sources"][0].pop("transform", None)  # the parent reads the plain text
    plain = build_source_loaders(MixtureSpec.from_dict(raw, base_dir=str(tmp_path)))[0]
    tok = plain.tokenizer
    texts = [t.upper() for t in plain.read_texts([0, 1])]
    assert got == [t.tolist() for t in tok.encode_batch(texts)]
