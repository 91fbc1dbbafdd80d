# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each installs into ./.venv on first use. TORCH_SPEC picks the torch build (CPU wheel by default here).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_CONFIG ?= examples/configs/zero1_fp32.json

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/shardwise --num_gpus 2 examples/train_gpt.py --deepspeed_config $(DEMO_CONFIG)

test: install
	$(VENV)/bin/ruff check shardwise tests examples benchmarks
	$(PY) -m pytest tests --durations=15

lint: install
	$(VENV)/bin/ruff check shardwise tests examples benchmarks

clean:
	rm -rf $(VENV) checkpoints runs .pytest_cache
