# On a fresh machine (everything goes into .venv/ in the repository):
#   make demo     set up .venv and serve the embedded model with its demo adapters
#   make serve    set up .venv and serve the embedded model (ARGS="--model DIR" for a checkpoint)
#   make test     set up .venv (with the test-only oracles) and run the whole test suite
#   make test-ui  only the dashboard's browser tests (needs Debian's chromium)
#   make test-ecosystem  the slow runs of external tools (lm-evaluation-harness) against a live server
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[examples]'
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(VENV)/.ecosystem: $(VENV)/.test
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,ecosystem]'
	touch $@

.PHONY: serve demo test test-ui test-ecosystem bench
serve: $(VENV)/.runtime
	$(BIN)/adapter-server serve $(ARGS)

demo: $(VENV)/.runtime
	$(BIN)/adapter-server serve --demo $(ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(ARGS)

test-ecosystem: $(VENV)/.ecosystem
	$(BIN)/python -m pytest -q -m ecosystem $(ARGS)

test-ui: $(VENV)/.test
	$(BIN)/python -m pytest -q tests/test_ui.py $(ARGS)

bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run $(ARGS)
