# Two commands on a fresh machine:
#   make serve   set up .venv and run the server on the embedded default model
#   make test    set up .venv (with the test-only oracles) and run the whole test suite
#   make test-ecosystem  the slow runs of external tools (lm-evaluation-harness) against a live server
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(VENV)/.ecosystem: $(VENV)/.test
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,ecosystem]'
	touch $@

.PHONY: serve test test-ecosystem bench
serve: $(VENV)/.runtime
	$(BIN)/adapter-server serve $(ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(ARGS)

test-ecosystem: $(VENV)/.ecosystem
	$(BIN)/python -m pytest -q -m ecosystem $(ARGS)

bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run $(ARGS)
