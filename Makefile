# Every target bootstraps .venv on a fresh machine, so `make demo` and `make test`
# are the only set-up commands.
#   TORCH   the torch requirement installed first; a GPU user keeps a CUDA build
#           with e.g. `make test TORCH="torch==2.13.0"` from their index, or
#           `make test TORCH= VENV_FLAGS=--system-site-packages` to reuse one.
PYTHON     ?= python3
TORCH      ?= torch==2.13.0
VENV_FLAGS ?=
EXTRAS     ?= test,plot,logs,scipy,examples,docs,export
VENV       := .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed

.PHONY: demo test lint docs bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(strip $(TORCH)),$(BIN)/pip install --quiet "$(TORCH)")
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/secondorder demo --threads 1 --out runs/demo

test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q

# The documentation site, into site/; strict: a warning, a broken link or an unresolved
# reference fails it. (The variable silences a notice Material prints on every build.)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/mfac_bench.py
	$(BIN)/python benchmarks/optim_sweep.py
	$(BIN)/python benchmarks/prune_bench.py
	$(BIN)/python benchmarks/distributed_bench.py
	$(BIN)/python benchmarks/curvature_bench.py
	$(BIN)/python benchmarks/lowrank_bench.py --no-progress

# Every GPU figure in one command (at most ~8 minutes on one CUDA device; report in
# runs/gpu_check.md). Its CPU dry run is part of `make test` (tests/test_gpu_check.py).
#   GPU_CHECK_ARGS  e.g. "--sparsegpt-ref ~/sparsegpt --gptq-ref ~/gptq" (the authors' checkouts)
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache .hypothesis
