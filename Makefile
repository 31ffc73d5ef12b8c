# Claude Max Relay. `make run` serves; `make test` runs the whole suite; `make bench` prints figures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI_VERSION := 2.1.330
CLI_DIR := .cli
CLI := $(CLI_DIR)/node_modules/.bin/claude
# Test files run in parallel processes (each with its own Redis, mock API and relays): most of a test's
# time is spent waiting on CLI starts, mock delays and timeouts (a run with 3 processes took as long with
# five other test runs beside it as alone), so 4 processes fit 2 cores.
PYTEST_WORKERS ?= 4

.PHONY: run test bench lint check clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(CLI):
	mkdir -p $(CLI_DIR)
	npm install --prefix $(CLI_DIR) --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code@$(CLI_VERSION)

run: $(VENV)/.deps
	$(PY) -m relay check
	exec $(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

test: $(VENV)/.test-deps $(CLI)
	@command -v bwrap >/dev/null || apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
		echo "bubblewrap is missing and could not be installed: the agent-mode tests will be skipped"
	$(VENV)/bin/ruff check relay tests bench wsgi.py gunicorn.conf.py
	$(VENV)/bin/mypy relay
	CLAUDE_TEST_BIN=$(abspath $(CLI)) $(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(VENV)/.test-deps $(CLI)
	CLAUDE_TEST_BIN=$(abspath $(CLI)) $(PY) bench/run.py

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check relay tests bench wsgi.py gunicorn.conf.py
	$(VENV)/bin/mypy relay

check: test

clean:
	rm -rf $(VENV) $(CLI_DIR) var log .pytest_cache .mypy_cache .ruff_cache
