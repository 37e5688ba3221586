# Every target installs what it needs into .venv first, so each works on a fresh clone.
# TORCH_SPEC picks the torch build: CI pins the local CPU wheel (torch==2.13.0);
# a user's machine gets a normal torch from pyproject.toml's range.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench bench-quick gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

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
	rm -rf $(VENV) demo_out bench_out .pytest_cache .mypy_cache .ruff_cache
