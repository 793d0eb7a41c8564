# Set-up and entry points. `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format venv clean

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

# Lint, then the whole test suite. pytest exits 5 when it collects no test: that fails too.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
