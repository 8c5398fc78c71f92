# pelmark: every target creates .venv on first use, so `make <target>` works on a fresh clone.
# MANIFEST=... switches the cohort for every target that reads one.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PELMARK := $(VENV)/bin/pelmark
STAMP := $(VENV)/.installed-stamp

OUT ?= outputs
PHANTOM_DIR ?= $(OUT)/phantom
PHANTOM_SUBJECTS ?= 12
PHANTOM_NOVEL ?= 4
PHANTOM_SPACING ?= 2.5
SEED ?= 0
MANIFEST ?= $(PHANTOM_DIR)/manifest.toml
STORE ?= $(OUT)/synth.zarr
SYNTH_ARGS ?=
RUNS ?= $(OUT)/runs
TRAIN_ARGS ?=
EVAL_OUT ?= $(OUT)/eval
EVAL_ARGS ?=
# make bench-gpu: where scripts/gpu-check.sh writes, and which of its parts run.
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_PARTS ?= tests registration renderer nanodrr trainer trainer-device synth compiled
# Runs that `make eval` compares, in table order (those that exist).
EVAL_STRATEGIES ?= baseline composite pel-only finetune seg-informed
# What `make demo` trains and evaluates: the baseline and its fine-tune, and seg-informed when EVAL_STRATEGIES names it.
# (The default EVAL_STRATEGIES, defined in this file, leaves it out, so the default demo stays as it was.)
comma := ,
DEMO_STRATEGIES = baseline finetune $(if $(filter file,$(origin EVAL_STRATEGIES)),,$(filter seg-informed,$(EVAL_STRATEGIES)))
EVAL_RUNS = $(foreach s,$(EVAL_STRATEGIES),$(if $(wildcard $(RUNS)/$(s)/run.json),$(RUNS)/$(s)))
# Training settings come from MANIFEST's [train] table ([train.<strategy>] overrides it), then TRAIN_ARGS.
TRAIN = $(PELMARK) train $(1) $(STORE) --out $(RUNS)/$(1) --config $(MANIFEST) --auto-resume $(TRAIN_ARGS)
# The phantom manifest is made on demand only when it is the cohort in use.
MANIFEST_DEP := $(if $(filter $(PHANTOM_DIR)/manifest.toml,$(MANIFEST)),$(PHANTOM_DIR)/manifest.toml)

.DEFAULT_GOAL := help
.PHONY: help install demo phantom synth preview train-baseline train-composite train-pel-only train-finetune train-seg-informed eval paper bench bench-gpu test test-fast clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP) ## Create .venv and install pelmark with its dependencies

demo: $(STAMP) ## Everything on the built-in phantom cohort: CTs, DRRs, baseline, fine-tune, Table 1 and figures
	@set -e; t0=$$(date +%s); \
	$(MAKE) --no-print-directory synth preview; t1=$$(date +%s); \
	$(MAKE) --no-print-directory train-baseline; t2=$$(date +%s); \
	$(MAKE) --no-print-directory train-finetune; t3=$$(date +%s); \
	$(if $(filter seg-informed,$(DEMO_STRATEGIES)),$(MAKE) --no-print-directory train-seg-informed;) t35=$$(date +%s); \
	$(MAKE) --no-print-directory eval EVAL_STRATEGIES="$(DEMO_STRATEGIES)" EVAL_ARGS="--refine $(EVAL_ARGS)"; t4=$$(date +%s); \
	echo "cohort: $(PHANTOM_DIR)  store: $(STORE)  runs: $(RUNS)  results: $(EVAL_OUT) (table1.csv, figures)"; \
	echo "stage seconds: phantom+synth+preview $$((t1-t0)), baseline $$((t2-t1)), finetune $$((t3-t2)),$(if $(filter seg-informed,$(DEMO_STRATEGIES)), seg-informed $$((t35-t3))$(comma)) eval $$((t4-t35)), total $$((t4-t0))" \
	  | tee $(OUT)/demo_timing.txt

phantom: $(PHANTOM_DIR)/manifest.toml ## Write the phantom pelvis cohort (CTs, landmarks, manifest, preview.png)

$(PHANTOM_DIR)/manifest.toml: | $(STAMP)
	$(PELMARK) phantom $(PHANTOM_DIR) --subjects $(PHANTOM_SUBJECTS) --novel-subjects $(PHANTOM_NOVEL) --seed $(SEED) --spacing $(PHANTOM_SPACING)

synth: $(STAMP) $(MANIFEST_DEP) ## Render MANIFEST's DRRs into STORE (resumes; see pelmark synth --help)
	$(PELMARK) synth $(MANIFEST) --out $(STORE) $(SYNTH_ARGS)

preview: $(STAMP) ## PNG montages of STORE's DRRs with their landmarks (check these first)
	$(PELMARK) synth preview $(STORE) --out $(OUT)/preview

train-baseline: synth ## U-Net with BCE (paper baseline) -> RUNS/baseline
	$(call TRAIN,baseline)

train-composite: synth ## BCE + λ·PEL from random weights -> RUNS/composite
	$(call TRAIN,composite)

train-pel-only: synth ## PEL alone from random weights -> RUNS/pel-only
	$(call TRAIN,pel-only)

train-finetune: train-baseline ## Fine-tune the baseline with PEL alone -> RUNS/finetune
	$(call TRAIN,finetune) --init $(RUNS)/baseline

train-seg-informed: synth ## Heatmaps + bone segmentation with visibility (seed 003; needs a cohort with [dataset] classes) -> RUNS/seg-informed
	$(call TRAIN,seg-informed)

eval: $(STAMP) ## Table 1 (CSV), per-image errors, pose metrics and figures of the runs in RUNS -> EVAL_OUT
	@test -n "$(strip $(EVAL_RUNS))" || { echo "make eval: no runs in $(RUNS); train one first (make train-baseline)" >&2; exit 1; }
	$(PELMARK) eval $(EVAL_RUNS) --store $(STORE) --out $(EVAL_OUT) --overwrite $(EVAL_ARGS)

paper: ## The paper's whole protocol (GPU machine): make paper MANIFEST=your-cohort.toml
	$(MAKE) --no-print-directory synth
	$(MAKE) --no-print-directory train-baseline train-composite train-pel-only train-finetune
	$(MAKE) --no-print-directory eval

bench: $(STAMP) ## Run the benchmarks (they print numbers and a final JSON line each)
	@for b in benchmarks/*_bench.py; do echo "== $$b"; OMP_NUM_THREADS=2 $(PY) $$b || exit 1; done

# The GPU figures of the README's benchmark table (issue 12's sizes): a 768² DRR of a 1 mm CT, synth of 4 CTs x 100
# views at 768², training steps at 512² with ResNet34 depth 5 (batch 32, then batch 64 compiled), and the
# registration layer at batch 32 x 8 landmarks, after the gpu-marked tests. Needs CUDA; BENCH_CT=file uses that CT
# instead of a 1 mm phantom. Each part has its own time limit (see the script).
BENCH_CT ?=
bench-gpu: $(STAMP) ## The gpu tests and the benchmarks at the README's GPU sizes, into GPU_CHECK_OUT (scripts/gpu-check.sh)
	PY=$(PY) OUT=$(GPU_CHECK_OUT) BENCH_CT=$(BENCH_CT) PARTS="$(GPU_CHECK_PARTS)" scripts/gpu-check.sh

test: $(STAMP) ## Run the whole test suite, slow end-to-end tests included
	$(PY) -m pytest -q

test-fast: $(STAMP) ## Run the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow"

clean: ## Remove outputs (keeps .venv)
	rm -rf $(OUT)
