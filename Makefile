# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv when missing, installs torch first (CPU wheel pinned, override with TORCH=...),
# then this package with what it needs; a second run reuses the environment.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[examples,test]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python examples/digits.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m ruff check lightning_pbt tests examples bench
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(ARGS)

# The GPU tier on a CUDA machine whose python already has torch, Lightning and pytest (no set-up, no
# Hydra needed): `make test-gpu PYTHON=python3`.
test-gpu:
	PYTHONPATH=. OMP_NUM_THREADS=1 $(PYTHON) -m pytest -p no:cacheprovider -o addopts="-ra --durations=10" tests/gpu $(ARGS)

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
