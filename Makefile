# One virtual environment in .venv, rebuilt when pyproject.toml changes.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HYDRA_FULL_ERROR ?= 0

.PHONY: install train test test-all bench bench-data lint clean sample-data

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk here, never an unasked-for CUDA download.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

train: install
	$(BIN)/python run.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-all: install
	$(BIN)/python -m pytest -q -m "" $(ARGS)

bench: install
	$(BIN)/python -m benchmarks.run_all

bench-data: install
	$(BIN)/python -m benchmarks.data_pipeline

lint: install
	$(BIN)/ruff check marco_lightning tests run.py scripts

sample-data: install
	$(BIN)/python scripts/build_sample.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache wandb
