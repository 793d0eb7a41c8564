# Set-up and entry points. `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-results test-rehearsal test-fast lint format venv constraints clean system-deps

venv: $(STAMP)

# The exact releases in constraints.txt: the same seeds give the same weights on a fresh install.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Re-resolve pyproject.toml's dependencies in a scratch environment (newest releases allowed)
# and write their exact versions to constraints.txt, keeping its header comment.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet -e '.[test]'
	{ grep '^#' constraints.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable \
		| grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

# The main job on its defaults and bundled data: the whole study (pre-train -> convert -> evaluate) on a
# local Ray instance, with the data built offline; results in runs/ and the MLflow store there.
demo: $(STAMP)
	$(PY) pipelines/pretrain_and_eval.py

# Lint (style, formatting, types), then the whole test suite but the `results` and `rehearsal`
# tests. pytest exits 5 when it collects no test: that fails too. Two processes (pytest-xdist),
# each taking whole modules (their module-scoped Ray instances and stacks stay one): alone, a
# test left about half of two slow cores idle while it waited on drivers, servers and Ray; two
# at once cut the suite by a quarter there (README, Tests).
TEST_PROCESSES ?= 2
test: system-deps lint
	$(PY) -m pytest -m "not results and not rehearsal" \
		-n $(TEST_PROCESSES) --dist loadfile

# The results checks (`results` marks them: tests/test_ranking.py): the demo's pre-training at 4x
# its budget ranked above random initialisation by three evaluations, about 15 minutes of
# training on 2 cores. Out of `make test` so that CI stays within its time; run them when the
# method, its presets or an evaluation changes.
test-results: $(STAMP)
	$(PY) -m pytest -m results

# The GPU checks' rehearsal (`rehearsal` marks it: tests/test_gpu_checks.py): every step of
# benchmarks/gpu_checks.sh at small sizes on the CPU, without the platform's packages, and the
# Ray loader's rows, about 4 minutes on 2 cores. Run it before the first call of a GPU loan
# (a script that fails there wastes the loan) and after a change to benchmarks/; out of `make
# test` so that CI stays within its time (the scripts' imports and types stay in it).
test-rehearsal: $(STAMP)
	$(PY) -m pytest -m rehearsal

# The developer loop: every test that starts no Ray, MLflow or S3 server and takes under ~10 s
# (`slow` marks the others; see tests/conftest.py). Under 3 minutes on 2 Xeon cores, 5 on 2 EPYC cores.
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

# System packages that pip cannot install and the tests need: PostgreSQL (the MLflow server's
# backend store in tests/test_stack.py's local stack), Chromium (its MLflow UI check, driven by
# Playwright with Debian's browser, never a downloaded one) and a C++ compiler (torch.compile
# on a CPU, in the compiled-training tests). CI runs `make test` on a fresh
# machine, so this installs them there; only what is missing, only as root with apt-get, and
# quietly. Elsewhere it names what is missing, and the stack tests fail with that name.
SYSTEM_PACKAGES := postgresql chromium g++
system-deps:
	@missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing system packages:$$missing (apt-get, about 2 minutes)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "warning: system packages missing:$$missing (as root: apt-get install$$missing)"; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
