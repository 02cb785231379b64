# Quickstart: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned here so that a fresh machine gets a matching torch/torchvision pair; override for other builds.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv demo study test test-fast lint typecheck format bench clean

# MLflow and W&B go on top of dev in a second pip call (pyproject.toml's trackers extra says why)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q -e ".[trackers]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py

# the paper's ResNet-18 comparisons on the bundled digits, 3 seeds each (about 25 minutes on 2 cores)
study: $(STAMP)
	$(BIN)/python experiments/study.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the package's type hints, checked as configured in pyproject.toml's [tool.mypy]
typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint typecheck
	$(BIN)/python -m pytest -q -x --timeout=900 --doctest-modules lightning_specclip tests

test-fast: lint typecheck
	$(BIN)/python -m pytest -q -m "not slow" --doctest-modules lightning_specclip tests

bench: $(STAMP)
	$(BIN)/python experiments/bench_spectrum.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache outputs multirun
