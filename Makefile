# One virtual environment in .venv, rebuilt when pyproject.toml changes.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HYDRA_FULL_ERROR ?= 0

.PHONY: install lock train test test-all bench bench-data bench-scifact bench-recipes lint clean sample-data

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk here, never an unasked-for CUDA download.
	$(BIN)/pip install -q torch==2.13.0
	# everything else at the exact versions of constraints.txt (pyproject.toml holds the compatible ranges)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lock: install  # rewrite constraints.txt from what .venv holds (after changing a range in pyproject.toml)
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.new && mv constraints.new constraints.txt

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

bench-scifact: install  # SciFact from task=mine to test metrics, project (static and refreshed negatives) vs sentence-transformers at 1, 2 and the chosen epochs (about 4 hours on 2 cores)
	$(BIN)/python -m benchmarks.run_all --only scifact

bench-recipes: install  # own-collection recipes and their levers vs sentence-transformers' paths (hours on 2 cores)
	$(BIN)/python scripts/classic_to_beir.py --out cache/classic --only cranfield,cisi
	$(BIN)/python -m benchmarks.recipes --folders cache/classic/cranfield,cache/classic/cisi

lint: install
	$(BIN)/ruff check marco_lightning tests run.py scripts benchmarks

sample-data: install
	$(BIN)/python scripts/build_sample.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache wandb
