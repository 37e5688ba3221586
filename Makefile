# Every target installs what it needs into .venv first, so each works on a fresh clone.
# TORCH_SPEC picks the torch build: CI pins the local CPU wheel (torch==2.13.0);
# a user's machine gets a normal torch from pyproject.toml's range.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OLDEST_VENV ?= .venv-oldest
# What the oldest-versions run tests: every test of the pixels and the encoders (the conversion
# paths, parity with torchvision, inputs, encoders, round trips, save_image's grids).
OLDEST_TESTS ?= tests/test_nan_positions.py tests/test_parity.py tests/test_encoders.py \
	tests/test_inputs.py tests/test_roundtrip.py tests/test_device_path.py tests/test_save_image.py

.PHONY: install test test-oldest smoke-python lint demo bench bench-quick gpu-check clean

# The install step re-runs whenever pyproject.toml or this file changes, and at least weekly (a
# stamp older than 6 days is dropped), upgrading to the newest releases the declared ranges admit
# (--upgrade, eager): what a new user installs. A torch already in .venv that TORCH_SPEC admits is
# kept (a CPU build installed by hand, say); make test prints the versions it runs (asyncdump info).
$(shell find $(STAMP) -mtime +6 -delete 2>/dev/null)
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -c $(VENV)/torch-constraint.txt \
		-e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m asyncdump info
	$(PY) -m pytest -q

# The lowest versions pyproject.toml declares for every direct dependency (uv's lowest-direct
# resolution), torch as TORCH_SPEC gives it (CI: the local CPU wheel), in a fresh venv.
test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q uv "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(OLDEST_VENV)/torch-constraint.txt
	$(OLDEST_VENV)/bin/uv pip install -q --python $(OLDEST_VENV)/bin/python \
		--resolution lowest-direct -c $(OLDEST_VENV)/torch-constraint.txt -e .
	$(OLDEST_VENV)/bin/uv pip install -q --python $(OLDEST_VENV)/bin/python \
		-c $(OLDEST_VENV)/torch-constraint.txt pytest pytest-timeout hypothesis pillow
	$(OLDEST_VENV)/bin/python -m asyncdump info
	$(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS)

# numpy batches and generate --generator without torch, on the oldest and newest Python.
smoke-python:
	.ci/smoke-python

lint: $(STAMP)
	$(VENV)/bin/ruff check asyncdump tests benchmarks
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) -m asyncdump demo

# The bench extra (pillow for pil_sync, matplotlib for the chart) is optional: without it
# those two are skipped with a note.
bench: $(STAMP)
	$(PY) -c "import PIL, matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]" \
		|| echo "bench extra not installed: pil_sync and the chart will be skipped"
	$(PY) -m asyncdump bench

bench-quick: $(STAMP)
	$(PY) -c "import PIL, matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]" \
		|| echo "bench extra not installed: pil_sync and the chart will be skipped"
	$(PY) -m asyncdump bench --quick

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .venv-smoke-* demo_out bench_out .pytest_cache .mypy_cache .ruff_cache
