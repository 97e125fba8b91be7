# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= models/demo
DEMO_ARTIFACT ?= artifacts/demo
PROMPT ?= def fibonacci(n):

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch==2.13.0 first: a bare torch requirement could resolve to another (CUDA) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/compile-model $(DEMO_MODEL) -o $(DEMO_ARTIFACT) --force
	$(BIN)/kiln generate $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-tokens 96 --echo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) artifacts
