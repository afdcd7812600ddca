# vmfork: the two set-up commands are `make demo` and `make test`; both install
# what is missing (system packages, the virtualenv) first, idempotently.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench system venv clean openapi

system:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c 'import vmfork, qemu.qmp, click, rich, psutil, fastapi, uvicorn, httpx, prometheus_client, mfusepy, zstandard' && touch $(STAMP)

venv: $(STAMP)

demo: system venv
	@bash scripts/demo.sh

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test: system venv lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

# The committed OpenAPI document (tests/test_service.py fails when it drifts).
openapi: venv
	$(BIN)/vmfork serve --print-openapi > docs/openapi.json

# Every benchmark at its defaults: clone, update, save, api, fork (vmfork bench all).
bench: system venv
	$(BIN)/vmfork bench all

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
