# make train : install, then train on the shipped sprites (ARGS="schedule=cosine timesteps=512" to override)
# make test  : install, then the fast test tier
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train test test-full lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest -m "not slow" $(ARGS)

test-full: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(PY) -m ruff check src tests bench train.py

clean:
	rm -rf logs outputs multirun .pytest_cache

bench: install
	$(VENV)/bin/python -m pip install -r requirements-bench.txt
	$(PY) bench/bench.py $(ARGS)
