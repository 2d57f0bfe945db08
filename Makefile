# covid-dg: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOLDOUT ?= mosmed
RUNS ?= runs
ARGS ?=
REPORT ?= reports/latest
PRESET ?= smoke
BACKEND ?= local
SWEEP ?= selection
QUICK ?=
ONLY ?=
# pytest-xdist workers of `make test`: one per core of a 2-core CI machine (TEST_WORKERS=0: one process)
TEST_WORKERS ?= 2
# torch is pinned to the CPU wheel this workplace keeps on disk; a looser range would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint demo smoke loso report select bench clean sweep-transfer sweep-loso sweep sweep-nnunet readme-numbers

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the package editable with [dev] (no-op when current)

test: install ## fast test suite (CPU, about 8 minutes on 2 cores)
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS)

test-all: install ## everything, including the slow end-to-end checks
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) -m "slow or not slow"

lint: install ## ruff
	$(VENV)/bin/ruff check .

smoke: install ## LOSO smoke run (about two minutes on 2 cores) on the phantom suite
	$(PY) -m experiments.loso --holdout $(HOLDOUT) experiment=smoke paths.runs=$(RUNS) $(ARGS)

demo: install ## LOSO demo: train on two phantom sources, test on the held-out one (HOLDOUT=mosmed)
	$(PY) -m experiments.loso --holdout $(HOLDOUT) experiment=demo paths.runs=$(RUNS) $(ARGS)

loso: install ## LOSO with the default preset: make loso HOLDOUT=ctseg ARGS="paths.data_root=/data"
	$(PY) -m experiments.loso --holdout $(HOLDOUT) paths.runs=$(RUNS) $(ARGS)

sweep-transfer: install ## train on each source, test on all: $(RUNS)/transfer-$(PRESET)/transfer_matrix.{csv,png,md} (PRESET=smoke|demo|full BACKEND=local|wandb|slurm)
	$(PY) -m sweeps.launch transfer --preset $(PRESET) --runs $(RUNS) --backend $(BACKEND) $(ARGS)

sweep-loso: install ## hold out each source in turn: $(RUNS)/loso-$(PRESET)/loso_table.{csv,md} (PRESET, BACKEND as above)
	$(PY) -m sweeps.launch loso --preset $(PRESET) --runs $(RUNS) --backend $(BACKEND) $(ARGS)

sweep: install ## any sweep in sweeps/: make sweep SWEEP=selection (LOSO with training-domain, last and oracle checkpoints)
	$(PY) -m sweeps.launch $(SWEEP) --preset $(PRESET) --runs $(RUNS) --backend $(BACKEND) $(ARGS)

sweep-nnunet: install ## nnU-Net v2 baseline on every plan of a finished sweep: make sweep-nnunet SWEEP_DIR=runs/loso-demo (needs nnU-Net, a GPU)
	$(PY) -m sweeps.nnunet $(SWEEP_DIR) --backend $(BACKEND) $(ARGS)

select: install ## DomainBed-style selection over a finished sweep: make select SWEEP_DIR=runs/hparams-smoke (docs/hparams.md)
	$(PY) -m experiments.select $(SWEEP_DIR) $(ARGS)

report: install ## tables and plots over every finished run under $(RUNS), into $(REPORT)
	$(PY) -m experiments.report $(RUNS) --out $(REPORT)

bench: install ## all benchmarks in one run -> bench/results.{json,md} (QUICK=1: a few minutes on 2 cores)
	$(PY) -m benchmarks.run $(if $(QUICK),--quick) --out bench

readme-numbers: install ## rerun the documented commands, rewrite the numbers tables of README.md and docs/ (ONLY=demo,smoke; ARGS=--dry-run)
	WANDB_MODE=offline $(PY) -m tools.readme_numbers $(if $(ONLY),--only $(ONLY)) $(ARGS)

clean: ## remove caches, runs and the venv
	rm -rf $(VENV) .cache runs reports wandb *.egg-info .pytest_cache .ruff_cache
