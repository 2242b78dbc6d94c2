# Everything installs into .venv; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch/torchvision pinned to the builds this machine serves from local disk;
# pyproject.toml keeps ranges for users' own CUDA builds.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Synthetic archive (4 slides x 16 tiles) -> segment on an embedded local Ray (CPU,
# bundled model) -> per-slide table.
demo: setup
	rm -rf demo/run
	$(BIN)/python -m jobs.synth demo/archive --slides 4 --tiles-per-slide 16 --size 256 --seed 0
	$(BIN)/python -m jobs.segment demo/archive --output demo/run --shard-size 16
	$(BIN)/python -m jobs.stats demo/run

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m jobs.bench masks

clean:
	rm -rf demo .pytest_cache .hypothesis
