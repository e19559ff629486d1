#!/usr/bin/env bash
# Everything that needs a GPU, in one run (`make bench-gpu`), with the machine's own python
# (it must hold torch and triton; no .venv is built and nothing is fetched):
#   env      the device, the driver, the versions;
#   tests    the CUDA-only tests (the consumer kernel on the GPU, the cuda symmetric heap
#            between two processes, the offload engine's copy stream and pinned staging);
#   overlap  benchmarks/gpu_overlap.py (the flag waits' cost; with 2+ GPUs the collectives);
#   offload  benchmarks/gpu_offload.py (largest GPT with and without offload, TFLOPS, the
#            planner against torch.cuda.max_memory_allocated, the gradient copy hidden).
# Each part runs under its own time limit; one that fails or overruns is reported and the
# next one runs; SKIP="overlap ..." leaves parts out. Logs and JSON results go to $OUT
# (default benchmarks/results/gpu-session).
#   GPU_PY=python3 OFFLOAD_ARGS="--device-gib 12 ..." bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SLIPSTREAM_CACHE=${SLIPSTREAM_CACHE:-/tmp/slipstream-cache}
OFFLOAD_ARGS=${OFFLOAD_ARGS:---device-gib 12 --seq-len 1024 --micro-batch 1 --probes 3 --probe-timeout 150}
OVERLAP_ARGS=${OVERLAP_ARGS:---repeats 20}

part() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)"; return ;; esac
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

part env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'
nproc; free -g | head -2; cc --version | head -1"
part tests "${TESTS_LIMIT:-240}" "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra \
    tests/overlap/test_cuda.py \
    tests/offload/test_engine.py::test_cuda_copy_stream_path_matches_torch_adamw_with_accumulation \
    "tests/offload/test_zero2.py::test_zero2_reduces_on_the_device_and_keeps_only_slices_on_the_host" \
    -k "cuda or gpu"
# shellcheck disable=SC2086
part overlap "${OVERLAP_LIMIT:-180}" "$PY" -m benchmarks.gpu_overlap $OVERLAP_ARGS \
    --json "$OUT/gpu-overlap.json"
# shellcheck disable=SC2086
part offload "${OFFLOAD_LIMIT:-420}" "$PY" -m benchmarks.gpu_offload $OFFLOAD_ARGS \
    --json "$OUT/gpu-offload.json"
