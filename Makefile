# Three commands set up a fresh machine (see README): `make demo`, `make app` and `make test`.
# CPU machines take the local CPU build of torch (TORCH=torch==2.13.0); on a GPU machine install your
# own torch first and run with TORCH= (empty) so nothing is reinstalled.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo app test test-all install install-app install-test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e .

install-app: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e ".[app]"

install-test: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e ".[test]"

demo: install
	$(BIN)/kaleido-s2v generate --prompt "The red striped circle moves to the left while the blue square bounces on a sandy floor." \
		--ref examples/toy/red_striped_circle.png --ref examples/toy/blue_square.png --seed 0 -o demo.mp4

# the web app (docs/app.md) with the built-in model on http://127.0.0.1:7860; more flags: make app APP_ARGS="--port 8000"
app: install-app
	$(BIN)/kaleido-s2v app $(APP_ARGS)

test: install-test
	$(BIN)/python -m pytest -q

test-all: install-test
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: install-test
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/bench_transformer.py
