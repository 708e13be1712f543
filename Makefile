# Two commands on a fresh machine: `make test` and `make book`. Each sets up .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
M3_MODELS := $(or $(BGEM3_HOME),$(HOME)/.cache/bgem3)/models
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export GLOG_v ?= 3

.PHONY: venv assets test test-all lint book book-quick book-check clean m3-small

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

assets: venv
	$(PY) -m bgem3_lib.weights.assets

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Fast suite (everything not marked slow, the package's doctests included), then lint: ruff and the
# import-linter contracts of pyproject.toml (the wings' layers, no cycles, no tests imported).
test: assets
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Everything, including the full-size (24-layer, 8194-position) equivalence run.
test-all: assets
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The book: JavaScript vendored by book/vendor_js.sh (npm pack), notebooks executed, HTML in _build/html.
# book-quick runs the same notebooks on small subsets (BGEM3_QUICK=1), for CI.
# M3-small and its ablation without self-distillation are trained by book/prebuild.py when missing, in one slot,
# while the chapters that load neither (the base encoder and random checkpoints) run in the other.
book: assets
	book/build.sh full

book-quick: assets
	book/build.sh quick

# M3-small (python -m bgem3_lib train --recipe m3-small, ~10 min here) and its ablation without
# self-distillation, trained only when their checkpoints are missing from the asset cache; the
# ablation runs second (never in parallel under -j) and reuses the first run's cached hidden states.
m3-small: $(M3_MODELS)/m3-small/config.json $(M3_MODELS)/m3-small-nosd/config.json

$(M3_MODELS)/m3-small/config.json: | assets
	$(PY) -m bgem3_lib train --recipe m3-small

$(M3_MODELS)/m3-small-nosd/config.json: | assets $(M3_MODELS)/m3-small/config.json
	$(PY) -m bgem3_lib train --recipe m3-small --no-self-distill

# Headless Debian chromium opens every page of _build/html (build it first) and checks it.
book-check: venv
	command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; else sudo apt-get update -q && \
	  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi; }
	$(PY) book/check_book.py _build/html --screenshots _build/screenshots

clean:
	rm -rf _build .pytest_cache .ruff_cache
