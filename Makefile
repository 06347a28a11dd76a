# The kit's two commands: `make run` (synthetic data unless DATA_DIR is given, every notebook, submission.csv)
# and `make test`. Everything runs inside .venv, built from requirements.txt on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORK_DIR ?= work
PROFILE ?= demo
DATA_DIR ?=
export MALLOC_MMAP_THRESHOLD_ := 67108864
export MALLOC_TRIM_THRESHOLD_ := 268435456

.PHONY: setup run test bench lint clean kaggle-bundle kaggle-check

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

run: setup
	$(BIN)/python -m kernel_utils.dev.pipeline --work-dir "$(WORK_DIR)" --profile "$(PROFILE)" $(if $(DATA_DIR),--data-dir "$(DATA_DIR)")

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m benchmarks.run_all --profile bench

lint: setup
	$(BIN)/ruff check .

kaggle-bundle: setup
	$(BIN)/python -m kernel_utils.dev.bundle --work-dir "$(WORK_DIR)" --out dist/kaggle --wheels

kaggle-check: setup
	$(BIN)/python -m benchmarks.kaggle_check $(if $(DATA_DIR),--work-dir "$(WORK_DIR)" --data-dir "$(DATA_DIR)")

clean:
	rm -rf "$(WORK_DIR)" .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
