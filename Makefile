# make train : install, then train on the shipped sprites (ARGS="schedule=cosine timesteps=512" to override)
# make test  : install (with requirements-dev.txt), then the fast test tier
# make gpu-check : on a GPU machine, what CI cannot check (ARGS=--cpu: the same on the CPU)
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install install-dev train test test-full lint bench gpu-check clean

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

train: install
	$(PY) train.py $(ARGS)

test: install-dev
	$(PY) -m pytest -m "not slow" $(ARGS)

test-full: install-dev
	$(PY) -m pytest $(ARGS)

lint: install-dev
	$(PY) -m ruff check src tests bench train.py

clean:
	rm -rf logs outputs multirun .pytest_cache

bench: install-dev
	$(VENV)/bin/python -m pip install -r requirements-bench.txt
	$(PY) bench/bench.py $(ARGS)

# on a GPU machine: precisions, resume exactness, DDP, CUDA vs CPU samples, speed vs the peers (bench/gpu_check.py);
# ARGS=--cpu runs the same checks on the CPU
gpu-check: install-dev
	$(VENV)/bin/python -m pip install -r requirements-bench.txt
	$(PY) bench/gpu_check.py $(ARGS)

