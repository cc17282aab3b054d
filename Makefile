# Two commands set everything up from a fresh clone: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
DATA ?=
DATASET ?=

PARITY_VENV := .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PARITY_STAMP := $(PARITY_VENV)/.installed

.PHONY: venv test test-slow demo parity-fixtures official-speed gpu-check-prepare gpu-check gpu-check-small clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=15 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# The demo pipeline (base training, search, distillation, report); DATA=PATH (an image tree or archive) or
# DATASET=NAME (TFDS) replaces the synthetic data, in a directory of its own unless WORKDIR is given.
DEMO_SOURCE := $(if $(DATA),$(DATA),$(DATASET))
DEMO_DIR := $(if $(and $(DEMO_SOURCE),$(filter file default,$(origin WORKDIR))),$(WORKDIR)-$(firstword $(subst ., ,$(notdir $(DEMO_SOURCE)))),$(WORKDIR))
DEMO_ARGS := $(if $(DEMO_SOURCE),--config.dataset=$(DEMO_SOURCE))

demo: $(STAMP)
	$(PY) -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:demo --workdir $(DEMO_DIR) $(DEMO_ARGS) $(ARGS)
	@echo "report: $(DEMO_DIR)/report.md (figures in $(DEMO_DIR)/figures; curves: tensorboard --logdir $(DEMO_DIR))"

# Reference numbers from the published TAS code (xautodl 1.0.0, on torch) for tests/parity_test.py, in a
# virtual environment of its own: the project never depends on torch. xautodl pins numpy<=1.19.5, which
# does not build for current Pythons; the parts used here need only torch, so it is installed without deps.
$(PARITY_STAMP):
	test -x $(PARITY_PY) || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 numpy==2.4.6
	$(PARITY_PY) -m pip install --quiet --disable-pip-version-check --no-deps xautodl==1.0.0
	touch $(PARITY_STAMP)

parity-fixtures: $(PARITY_STAMP)
	$(PARITY_PY) tools/parity/make_fixtures.py --out tests/fixtures/parity

# The official code's search iteration and training step against this project's, side by side (CPU).
official-speed: $(STAMP) $(PARITY_STAMP)
	$(PY) tools/official_speed.py $(ARGS)

# The prepared accelerator check (tools/device_check.py; docs/PERFORMANCE.md). gpu-check-prepare, here: the
# wheels the GPU image lacks and the CIFAR-10 archive (DATA=PATH) into .device/, which is ignored and carried.
# gpu-check, on the GPU machine from the repository root (no venv: the image's python3). gpu-check-small,
# here: the same script at toy size on the CPU.
OUT ?= device-check
DEVICE_WHEELS := ml_collections==1.1.0 tensorboardX==2.6.5
gpu-check-prepare:
	mkdir -p .device/wheels .device/data
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
	    --python-version 3.12 --implementation cp -d .device/wheels $(DEVICE_WHEELS)
	$(if $(DATA),cp $(DATA) .device/data/,@echo "no DATA=PATH given: the check will use synthetic data")

gpu-check:
	tools/device_check.sh $(OUT)

gpu-check-small: $(STAMP)
	$(PY) tools/device_check.py --mode small --out $(OUT) $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) $(PARITY_VENV) .pytest_cache
