# Every target does its own set-up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: the embedded broker on 127.0.0.1:8080 (no other service needed)
run: $(STAMP)
	$(BIN)/broker serve

lint: $(STAMP)
	$(BIN)/ruff check broker tests
	$(BIN)/mypy broker

## test: lint, type-check, then the whole suite (pytest exits 5 when it collects nothing: that fails too)
test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
