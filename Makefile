# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make run    fine-tune the embedded SmolLM2-135M-Instruct on the built-in arithmetic task
#   make test   run the test suite (unit, integration and slow end-to-end tests)
# Both create .venv on first use. torch is installed first, at the exact CPU build this
# environment provides, so that no other torch (with GBs of CUDA packages) is pulled in.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: run test install

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
