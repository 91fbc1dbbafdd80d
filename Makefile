# Entry points for a fresh machine (see README): `make demo` and `make test`; `make lock` and `make test-latest`
# keep the pinned versions current.
# `make install` installs into ./.venv, every package at the version pinned in requirements/lock.txt (pip
# constraints), so that a new upstream release cannot change what the tests run against; pyproject.toml keeps ranges.
# TORCH_SPEC picks the torch release (the CPU wheel by default here), TORCH_INDEX an extra index for another build of
# it (e.g. CUDA: TORCH_INDEX=https://download.pytorch.org/whl/cu128). LOCK= (empty) installs without pins.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
LOCK ?= requirements/lock.txt
DEMO_CONFIG ?= examples/configs/zero1_fp32.json
LINT_PATHS := shardwise tests examples benchmarks tools
# test-latest: a separate venv with the newest releases the ranges allow (torch stays TORCH_SPEC: pass
# TORCH_SPEC=torch for the newest torch too, a multi-GB download where no local wheel exists)
LATEST_VENV := .venv-latest
LATEST_TESTS ?= tests
# test-oldest: a separate venv with the floors of requirements/oldest.txt (transformers 4.45), running the tests that
# use transformers (auto-TP inference for every architecture, the Hugging Face training plan)
OLDEST_VENV := .venv-oldest
OLDEST_TESTS ?= $(wildcard tests/distributed/test_inference_*.py tests/unit/test_autotp_*.py) \
	tests/distributed/test_tp_layers.py tests/unit/test_tp_plans.py

PIN := $(if $(LOCK),-c $(LOCK))
TORCH_FROM := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: install demo test lint lock latest-venv test-latest test-oldest check-lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) $(TORCH_FROM) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIN) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/shardwise --num_gpus 2 examples/train_gpt.py --deepspeed_config $(DEMO_CONFIG)

test: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(PY) -m pytest tests --durations=15

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)

# The lock's format, and a pin inside every range of pyproject.toml (also a unit test: tests/unit/test_lockfile.py).
check-lock: install
	$(PY) tools/lockfile.py check $(LOCK) pyproject.toml

# A fresh venv with the newest release of every dependency the ranges of pyproject.toml allow (no pins).
latest-venv:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_FROM) "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q -e ".[dev]"

# Refresh every pin: the newest releases, frozen into requirements/lock.txt (then run `make test` and commit).
lock: latest-venv
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | $(LATEST_VENV)/bin/python tools/lockfile.py write requirements/lock.txt
	$(LATEST_VENV)/bin/python tools/lockfile.py check requirements/lock.txt pyproject.toml
	@git diff --stat -- requirements/lock.txt || true

# The suite against the newest releases, to find drift on purpose: prints what differs from the lock, then runs
# LATEST_TESTS (default: the whole suite; e.g. LATEST_TESTS="tests/distributed/test_inference_parity.py").
test-latest: latest-venv
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | $(LATEST_VENV)/bin/python tools/lockfile.py write $(LATEST_VENV)/lock.txt
	@diff -u requirements/lock.txt $(LATEST_VENV)/lock.txt | grep '^[-+][a-z0-9]' || echo "test-latest: the newest releases are the pinned ones"
	$(LATEST_VENV)/bin/python -m pytest $(LATEST_TESTS) --durations=15

# The transformers-dependent tests against the oldest releases the project claims (requirements/oldest.txt).
test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(TORCH_FROM) "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install -q -c requirements/oldest.txt -e ".[dev]"
	$(OLDEST_VENV)/bin/python -m pytest $(OLDEST_TESTS) --durations=15

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) checkpoints runs .pytest_cache
