# dsa110-contimg: `make demo` and `make test` are all a new machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv demo test test-fast lint bench bench-e2e bench-catalogue bench-day faults clean clean-bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/contimg casa-check --state-dir $(CURDIR)/.state
	touch $(STAMP)

demo: venv
	$(BIN)/python scripts/demo.py

# CI runs `make test`: the lint checks first (layers, types, style), then every test.
test: venv lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff; the import contracts of the layers (pyproject.toml [tool.importlinter]); mypy over the
# stage declarations, results and the daemon's tables ([tool.mypy])
lint: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: venv
	$(BIN)/python benchmarks/run_all.py

# plain chain vs the daemon on 3 groups, speed and accuracy, one run (BENCH_ARGS="--preset tiny")
bench-e2e: venv
	$(BIN)/python benchmarks/bench_e2e.py $(BENCH_ARGS)

# the sky catalogue at NVSS size (1.8 M rows): build time and cone-search latency vs 50 ms
bench-catalogue: venv
	$(BIN)/python benchmarks/bench_catalogue.py $(BENCH_ARGS)

# a simulated day at one declination (one calibrator transit, gains drifting): coverage and accuracy
bench-day: venv
	$(BIN)/python benchmarks/bench_day.py $(BENCH_ARGS)

faults: venv
	$(BIN)/python tests/faults/run.py

clean:
	rm -rf .state .test-state build *.egg-info src/*.egg-info

# bench-e2e's products and report (~38 GB); keeps the simulated groups (.bench/groups)
clean-bench:
	rm -rf .bench/e2e-*
