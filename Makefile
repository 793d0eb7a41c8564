# Set-up and entry points. `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on its defaults and bundled data: the whole study (pre-train -> convert -> evaluate) on a
# local Ray instance, with the data built offline; results in runs/ and the MLflow store there.
demo: $(STAMP)
	$(PY) pipelines/pretrain_and_eval.py

# Lint (style, formatting, types), then the whole test suite. pytest exits 5 when it collects
# no test: that fails too.
test: lint
	$(PY) -m pytest

# The developer loop: every test that starts no Ray, MLflow or S3 server and takes under ~10 s
# (`slow` marks the others; see tests/conftest.py). Under 3 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# ruff's rules and formatting over the repository; mypy over the files [tool.mypy] names.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
