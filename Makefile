# pelmark: every target creates .venv on first use, so `make <target>` works on a fresh clone.
# MANIFEST=... switches the cohort for every target that reads one.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PELMARK := $(VENV)/bin/pelmark
STAMP := $(VENV)/.installed-stamp

OUT ?= outputs
PHANTOM_DIR ?= $(OUT)/phantom
PHANTOM_SUBJECTS ?= 6
PHANTOM_SPACING ?= 2.5
SEED ?= 0
MANIFEST ?= $(PHANTOM_DIR)/manifest.toml
STORE ?= $(OUT)/synth.zarr
SYNTH_ARGS ?=
# The phantom manifest is made on demand only when it is the cohort in use.
MANIFEST_DEP := $(if $(filter $(PHANTOM_DIR)/manifest.toml,$(MANIFEST)),$(PHANTOM_DIR)/manifest.toml)

.DEFAULT_GOAL := help
.PHONY: help install demo phantom synth train-baseline train-composite train-pel-only train-finetune eval paper bench test test-fast clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP) ## Create .venv and install pelmark with its dependencies

demo: synth ## The main job on the built-in phantom cohort: phantom CTs, DRR store, previews
	$(PELMARK) synth preview $(STORE) --out $(OUT)/preview
	@echo "cohort: $(PHANTOM_DIR)  store: $(STORE)  previews: $(OUT)/preview/*.png"

phantom: $(PHANTOM_DIR)/manifest.toml ## Write the phantom pelvis cohort (CTs, landmarks, manifest, preview.png)

$(PHANTOM_DIR)/manifest.toml: | $(STAMP)
	$(PELMARK) phantom $(PHANTOM_DIR) --subjects $(PHANTOM_SUBJECTS) --seed $(SEED) --spacing $(PHANTOM_SPACING)

synth: $(STAMP) $(MANIFEST_DEP) ## Render MANIFEST's DRRs into STORE (resumes; see pelmark synth --help)
	$(PELMARK) synth $(MANIFEST) --out $(STORE) $(SYNTH_ARGS)

train-baseline train-composite train-pel-only train-finetune eval paper: $(STAMP)
	@echo "make $@: this stage arrives in a later version of pelmark" >&2; exit 2

bench: $(STAMP) ## Run the benchmarks (they print numbers and a final JSON line each)
	@for b in benchmarks/*_bench.py; do echo "== $$b"; OMP_NUM_THREADS=2 $(PY) $$b || exit 1; done

test: $(STAMP) ## Run the whole test suite, slow end-to-end tests included
	$(PY) -m pytest -q

test-fast: $(STAMP) ## Run the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow"

clean: ## Remove outputs (keeps .venv)
	rm -rf $(OUT)
