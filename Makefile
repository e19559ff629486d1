# Every target bootstraps .venv on first use; installs always pass constraints.txt (pins torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo
DEMO_SPEC := recipes/data/demo.toml

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

$(DEMO_DIR)/manifest.json: | $(STAMP)
	$(PY) -m slipstream data prepare-demo $(DEMO_DIR) --spec-out $(DEMO_SPEC)

demo: $(STAMP) $(DEMO_DIR)/manifest.json
	$(PY) -m slipstream data preview $(DEMO_SPEC) --steps 20

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check slipstream tests benchmarks
	$(PY) -m ruff format --check slipstream tests benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix slipstream tests benchmarks
	$(PY) -m ruff format slipstream tests benchmarks

bench: $(STAMP) $(DEMO_DIR)/manifest.json
	$(PY) -m benchmarks.data_throughput
	$(PY) -m benchmarks.balance

clean:
	rm -rf $(VENV) build *.egg-info
