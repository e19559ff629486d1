#!/usr/bin/env bash
# A newcomer's first hour, from a fresh clone: the README's commands in order, each timed.
#   bash benchmarks/first_hour.sh [CLONE_DIR]   (default /tmp/slipstream-first-hour)
# Clones this checkout's HEAD, then: make demo, slipstream init on a folder of gzipped JSON
# lines and a parquet file (the standard library's own modules), train, export, and loads the
# export with transformers. Prints each command's output and wall time.
set -euo pipefail
SRC=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
DIR=${1:-/tmp/slipstream-first-hour}
rm -rf "$DIR"
git clone -q "$SRC" "$DIR"
cd "$DIR"
echo "commit $(git rev-parse --short HEAD); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
step() { echo; echo "\$ $*"; local t0=$SECONDS; "$@"; echo "[$((SECONDS - t0)) s]"; }
step make demo
PY=.venv/bin/python
mkdir -p mine/corpus mine/papers
$PY - <<'PY'
import gzip, json, pathlib, sysconfig
import pyarrow as pa, pyarrow.parquet as pq
lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
mods = sorted(p for p in lib.glob("*.py"))
for i in range(3):
    with gzip.open(f"mine/corpus/part-{i}.jsonl.gz", "wt") as f:
        for p in mods[i::3][:56]:
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
email = sorted((lib / "email").glob("*.py"))
pq.write_table(pa.table({"text": [p.read_text() for p in email]}), "mine/papers/email.parquet")
PY
step $PY -m slipstream init my-run --data 'mine/corpus/*.jsonl.gz' --data mine/papers/ --vocab-size 2048
step $PY -m slipstream train my-run.toml --set train.steps=200
step $PY -m slipstream export runs/my-run hf/my-run
step $PY - <<'PY'
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained("hf/my-run")
tok = transformers.AutoTokenizer.from_pretrained("hf/my-run")
ids = tok("def main():\n    return", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20, do_sample=False)
print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
print(repr(tok.decode(out[0])))
PY
