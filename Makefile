# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite: ruff,
# import-linter's layer contracts from pyproject.toml, then pytest).
# `make docs` builds the documentation site strictly.
# `make test-versions` (slow, not part of `make test`) runs the core tests against the oldest and the
# newest Lightning release that pyproject.toml promises.
# Each creates .venv when missing, installs torch first (CPU wheel pinned, override with TORCH=...),
# then this package with what it needs; a second run reuses the environment.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu test-versions lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[examples,test]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python examples/digits.py $(ARGS)

# No environment variable pinned: the suite passes in any shell (a test's child processes set their own
# thread count, as the docs advise for several ranks on few cores).
test: $(STAMP)
	$(BIN)/python -m ruff check lightning_pbt tests examples bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(ARGS)

# The GPU tier on a CUDA machine whose python already has torch, Lightning and pytest (no set-up, no
# Hydra needed): `make test-gpu PYTHON=python3`.
test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -p no:cacheprovider -o addopts="-ra --durations=10" tests/gpu $(ARGS)

# Each release gets its own environment under $(VERSIONS_DIR): $(TORCH), then pytorch-lightning and
# lightning at that release with this package. pip refuses a release outside the declared ranges.
# The core tests: unit tests (including the check of every private Lightning internal we use), the
# LightningCLI example, and a 2x2 population with exploit, lineage, resume and an elastic restart.
LIGHTNING_VERSIONS ?= 2.6.0 2.6.6
VERSIONS_DIR ?= .venv-versions
CORE_TESTS ?= tests/unit tests/examples/test_cli.py
CORE_DISTRIBUTED ?= tests/distributed/test_population.py -k "run_2x2 or lineage_has_init or resume"

test-versions:
	@failed=""; for version in $(LIGHTNING_VERSIONS); do \
		venv="$(VERSIONS_DIR)/lightning-$$version"; py="$$venv/bin/python"; \
		echo "== Lightning $$version with $(TORCH) in $$venv"; \
		{ test -x "$$py" || $(PYTHON) -m venv "$$venv"; } \
		&& "$$py" -m pip install --quiet --upgrade pip \
		&& "$$py" -m pip install --quiet "$(TORCH)" \
		&& "$$py" -m pip install --quiet -e ".[examples,test]" "pytorch-lightning==$$version" "lightning==$$version" \
		&& "$$py" -m lightning_pbt.internals pytorch_lightning lightning.pytorch \
		&& "$$py" -m pytest -q -p no:cacheprovider $(CORE_TESTS) \
		&& "$$py" -m pytest -q -p no:cacheprovider $(CORE_DISTRIBUTED) \
		|| failed="$$failed $$version"; \
	done; \
	if [ -n "$$failed" ]; then echo "== FAILED with Lightning:$$failed"; exit 1; fi; \
	echo "== passed with Lightning $(LIGHTNING_VERSIONS)"

# The documentation site (mkdocs.yml, docs/) into site/, strictly: a broken link or reference fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(VERSIONS_DIR) build site *.egg-info .pytest_cache
