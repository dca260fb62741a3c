# Set-up and entry points. `make test` and `make demo` work from a bare machine: they create the
# virtual environment, install torch 2.13.0 (CPU) first so no CUDA build is pulled, then install
# the package editable with its dev extras.
PYTHON ?= python3
# Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning made 2-thread
# torch runs 5-30x slower whenever another process was busy (measured by `sae-adaptive compare`).
export OMP_WAIT_POLICY ?= PASSIVE
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sae-adaptive-installed

.PHONY: install test lint format demo clean

$(STAMP): pyproject.toml constraints.txt _sae_adaptive_plugin_autoload.py sae_adaptive_plugin-autoload.pth sae_adaptive_plugin-autoload.start
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest -q

demo: install
	$(BIN)/sae-adaptive compare --seeds 3 --overwrite

clean:
	rm -rf $(VENV) dist build runs .pytest_cache .ruff_cache
