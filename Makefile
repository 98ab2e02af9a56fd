# Every target does its own set-up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PB     := broker/_pb/broker_pb2.py

# The browser tests drive Debian's Chromium (a test tool's own browser download cannot work here).
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint chromium bench clean

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
	$(BIN)/ruff check broker tests bench
	$(BIN)/mypy broker

## chromium: Debian's chromium and fonts for the browser tests, unless one is there (or BROKER_CHROMIUM)
chromium:
	@if [ -z "$$BROKER_CHROMIUM" ] && ! command -v chromium >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			chromium fonts-dejavu-core fonts-liberation >/dev/null; \
	fi

## test: lint, type-check, then the whole suite (pytest exits 5 when it collects nothing: that fails too)
test: lint chromium
	$(BIN)/python -m pytest

## bench: the benchmarks (PLAN=quick by default; full, tiny), results in bench/results/
PLAN ?= quick
bench: $(STAMP) $(PB)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/broker bench --plan $(PLAN)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
