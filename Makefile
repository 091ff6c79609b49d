# Set-up and entry points. `make demo` and `make test` each create or reuse
# the virtual environment in .venv and install what they need first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: setup setup-test demo app test e2e screenshots bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# the library (cam_plugin/) installed in editable mode: importable by its
# own name everywhere, no sys.path edits
$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e .
	$(PY) .ci/ensure_mongod.py
	touch $@

$(TEST_STAMP): requirements-test.txt $(RUNTIME_STAMP)
	$(PY) -m pip install -r requirements-test.txt
	touch $@

setup: $(RUNTIME_STAMP)

setup-test: $(TEST_STAMP)

# The demo (examples/demo.py) keeps its database in .demo/db, served by a
# mongod of its own (never the one of ~/.fiftyone, even while an App is open
# on it); the App it opens finds this plugin through a plugins dir that links
# to this checkout
demo: setup
	$(PY) examples/demo.py --dir $(DEMO_DIR) --db $(DEMO_DIR)/db $(ARGS)

app: setup
	mkdir -p $(DEMO_DIR)/plugins && ln -sfn $(CURDIR) $(DEMO_DIR)/plugins/cam_plugin
	FIFTYONE_PLUGINS_DIR=$(DEMO_DIR)/plugins $(PY) examples/demo.py --dir $(DEMO_DIR) --db $(DEMO_DIR)/db --app $(ARGS)

test: setup-test
	$(PY) -m pytest tests $(ARGS)

e2e: setup-test
	$(PY) -m pytest tests/e2e $(ARGS)

# the App screenshots shown in the README
screenshots: setup-test
	CAM_PLUGIN_SCREENSHOTS=$(CURDIR)/docs $(PY) -m pytest tests/e2e $(ARGS)

bench: setup-test
	$(PY) bench/throughput.py --memory 10000 $(ARGS)
	$(PY) bench/scorecam.py
	$(PY) bench/attention_metrics.py --threads 1
	$(PY) bench/reliance.py
	$(PY) bench/cues.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache *.egg-info
