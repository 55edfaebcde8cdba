# The two commands of the README: `make demo` (the seed's experiment) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-unit lint bench setup clean

setup:
	@VENV=$(VENV) scripts/setup

demo: setup
	$(BIN)/kproxy-nft demo

test: setup lint
	$(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q -m "not kernel"

lint: setup
	$(BIN)/ruff check kproxy_nft tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/bench_compile.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
