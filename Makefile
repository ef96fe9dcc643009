# The two commands a newcomer needs: `make demo` and `make test`.
# Both install whatever is missing (apt packages, .venv with the stockade script).
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench deps clean

deps:
	@./scripts/ensure-deps.sh

$(STAMP): pyproject.toml | deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev,server]'
	@touch $(STAMP)

demo: deps $(STAMP)
	@$(BIN)/stockade doctor
	@echo
	@$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

test: deps $(STAMP) lint typecheck
	@$(BIN)/stockade image build
	$(BIN)/pytest tests

bench: $(STAMP)
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
