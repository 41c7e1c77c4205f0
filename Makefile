# abexp — every target bootstraps .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export WANDB_SILENT := true

.PHONY: setup test bench demo figures reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch and torchvision first, together and pinned: an unpinned torch pulls the CUDA build.
	$(BIN)/pip install -q torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest tests

bench: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m abexp.bench

clean:
	rm -rf $(VENV) *.egg-info
