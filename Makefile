# Every target installs what it needs on a fresh clone: nothing is done by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := .tools
NPM_STAMP := $(TOOLS)/npm/.installed
BROWSER_STAMP := $(TOOLS)/.chromium
SANDBOX_STAMP := $(TOOLS)/.sandbox
CONFIG ?= broker.toml

.PHONY: help venv tools browser sandbox lint typecheck test run bench demo clean

help:
	@echo "make run    start the broker on 127.0.0.1:8765 (SQLite, example connectors)"
	@echo "make test   ruff, pyright and the whole test suite"
	@echo "make lint   ruff format check and ruff lint only"
	@echo "make bench  the pure core's cost per call, then the broker's against a direct connection"
	@echo "make demo   a good, a delegating and a rogue agent against a fresh broker"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,servers]'
	touch $(STAMP)

venv: $(STAMP)

# Real downstream servers from npm (server-everything, server-filesystem, inspector-cli, the
# conformance suite and the Node 22 it needs), pinned by tests/servers/package-lock.json.
$(NPM_STAMP): tests/servers/package.json tests/servers/package-lock.json
	mkdir -p $(TOOLS)/npm
	cp tests/servers/package.json tests/servers/package-lock.json $(TOOLS)/npm/
	cd $(TOOLS)/npm && npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

# Debian's Chromium for the review-page tests (Playwright drives it via executable_path).
$(BROWSER_STAMP):
	@mkdir -p $(TOOLS)
	@if ! command -v chromium >/dev/null; then \
		echo "installing Debian chromium (once)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi
	touch $(BROWSER_STAMP)

# bubblewrap jails stdio connectors (setpriv and prlimit come with util-linux).
$(SANDBOX_STAMP):
	@mkdir -p $(TOOLS)
	@if ! command -v bwrap >/dev/null; then \
		echo "installing Debian bubblewrap (once)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	fi
	touch $(SANDBOX_STAMP)

tools: $(NPM_STAMP)

sandbox: $(SANDBOX_STAMP)

browser: $(BROWSER_STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/pyright

test: $(STAMP) tools browser sandbox lint typecheck
	$(BIN)/pytest -q $(PYTEST_ARGS)

run: $(STAMP) sandbox
	@if [ ! -f $(CONFIG) ]; then $(BIN)/broker init --config $(CONFIG) --examples; fi
	$(BIN)/broker serve --config $(CONFIG)

bench: $(STAMP)
	$(PY) -m bench.core
	$(PY) -m bench $(BENCH_ARGS)

demo: $(STAMP) tools
	$(PY) -m examples.demo

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache .coverage
