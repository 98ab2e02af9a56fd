# Every target does its own set-up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PB     := broker/_pb/broker_pb2.py

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The gRPC code is generated from protos/ (never edited or committed): again when the proto changes.
$(PB): protos/broker/v1/broker.proto $(STAMP)
	mkdir -p broker/_pb
	$(BIN)/python -m grpc_tools.protoc -Ibroker/_pb=protos/broker/v1 --python_out=. \
		--grpc_python_out=. --pyi_out=. protos/broker/v1/broker.proto
	touch broker/_pb/__init__.py

## run: the embedded broker on 127.0.0.1:8080 (no other service needed)
run: $(STAMP) $(PB)
	$(BIN)/broker serve

lint: $(STAMP) $(PB)
	$(BIN)/ruff check broker tests
	$(BIN)/mypy broker

## test: lint, type-check, then the whole suite (pytest exits 5 when it collects nothing: that fails too)
test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
