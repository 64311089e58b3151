# medflow: `make demo` sets up and runs the nightly job on a generated demo archive;
# `make test` sets up and runs lint, type checks and the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup system-packages demo test lint pytest bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the reference Merlin package, for the checkpoint-compatibility test only: its image tower
	# needs nothing beyond what is installed, so skip its heavy training dependencies
	$(BIN)/python -m pip install -q --no-deps merlin-vlm==0.0.7
	touch $@

# Debian packages the tests need (tests/debian-packages.txt): installed when missing, as root
system-packages:
	sh tests/debian-packages.sh tests/debian-packages.txt

demo: setup
	$(BIN)/medflow demo --out demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict medflow/storage medflow/encoders

pytest: system-packages setup
	$(BIN)/python -m pytest -q

test: pytest lint

bench: setup
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf demo .pytest_cache .mypy_cache .ruff_cache
