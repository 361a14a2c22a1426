# Everything runs from the project's own virtualenv, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lint format typecheck test test-fast soak bench demo clean

$(STAMP): pyproject.toml scripts/honker_wheel.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# On glibc < 2.38 this builds a repaired honker wheel into .wheels/ (see
	# docs/decisions/001-honker-wheel-repair.md); elsewhere it does nothing.
	$(BIN)/python scripts/honker_wheel.py --dest .wheels --python $(BIN)/python
	$(BIN)/python -m pip install -q --find-links .wheels -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/typecheck.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/python scripts/typecheck.py

# The whole suite: lint, unit tests, conformance for every transport, examples,
# and SQLAlchemy's own dialect compliance suite against the Honker dialect.
test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(BIN)/python compliance/sqlalchemy/run.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow" $(PYTEST_ARGS)

# 1,000,000 events per transport past a stalled and a fast subscriber (not in
# `make test`, which runs the same test with 20,000). See docs/reliability.md.
SOAK_EVENTS ?= 1000000
soak: $(STAMP)
	ALKPUBSUB_SOAK_EVENTS=$(SOAK_EVENTS) $(BIN)/python -m pytest -q -m soak tests/reliability $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/single_node.py

clean:
	rm -rf $(VENV) .wheels build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
