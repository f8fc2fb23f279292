# make bench: the benchmark with its defaults.  make test: lint and the test suite.
# Both create .venv with pinned versions on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bench test lint

$(VENV)/.installed: requirements.txt requirements-test.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

bench: $(VENV)/.installed
	$(PY) -m hidiffusion_lib.bench $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(ARGS)
