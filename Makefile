# Two commands set everything up from a fresh clone: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
DATA ?=
DATASET ?=

.PHONY: venv test test-slow demo clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# The demo pipeline (base training, search, distillation, report); DATA=PATH (an image tree or archive) or
# DATASET=NAME (TFDS) replaces the synthetic data, in a directory of its own unless WORKDIR is given.
DEMO_SOURCE := $(if $(DATA),$(DATA),$(DATASET))
DEMO_DIR := $(if $(and $(DEMO_SOURCE),$(filter file default,$(origin WORKDIR))),$(WORKDIR)-$(firstword $(subst ., ,$(notdir $(DEMO_SOURCE)))),$(WORKDIR))
DEMO_ARGS := $(if $(DEMO_SOURCE),--config.dataset=$(DEMO_SOURCE))

demo: $(STAMP)
	$(PY) -m experiments.pipeline --config experiments/configs/pipeline.py:demo --workdir $(DEMO_DIR) $(DEMO_ARGS) $(ARGS)
	@echo "report: $(DEMO_DIR)/report.md (figures in $(DEMO_DIR)/figures; curves: tensorboard --logdir $(DEMO_DIR))"

clean:
	rm -rf $(VENV) .pytest_cache
