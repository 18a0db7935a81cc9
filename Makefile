# `make demo` and `make test` create .venv and install jaxcomp into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs

.PHONY: demo results results-alone test test-slow test-all bench export lint format clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxcomp needs Python >= 3.11, but $(PYTHON) is " + sys.version.split()[0] + "; run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,export]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxcomp.recipe --config=configs/demo.py --workdir=$(WORKDIR)/demo

# The full-length recipe (hours on 2 CPU cores); resumes where it stopped.
results: $(STAMP)
	$(BIN)/python -m jaxcomp.recipe --config=configs/compress.py --workdir=$(WORKDIR)/compress \
		--results_dir=results --latency

# The recipe's stages that need no teacher, 3 seeds each (a few hours on 2 CPU cores).
results-alone: $(STAMP)
	$(BIN)/python -m jaxcomp.recipe --config=configs/compress_alone.py \
		--workdir=$(WORKDIR)/compress_alone --results_dir=results/alone --latency

# Tests mostly wait on single-threaded XLA compiles: one worker per core (at most 4).
# `loadgroup` keeps the tests of one `xdist_group` on one worker, so that their
# module fixture (the two-process runs of tests/test_distributed.py) is built once.
PYTEST := $(BIN)/python -m pytest --numprocesses=auto --maxprocesses=4 --dist=loadgroup

test: $(STAMP)
	$(PYTEST)

# The tests `make test` deselects. pytest exits 5 when it collects none: not a failure.
test-slow: $(STAMP)
	$(PYTEST) -m slow || [ $$? -eq 5 ]

test-all: $(STAMP)
	$(PYTEST) -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/efficiency.py
	$(BIN)/python benchmarks/prune.py
	$(BIN)/python benchmarks/quant.py
	$(BIN)/python benchmarks/distill.py
	$(BIN)/python benchmarks/huge_pages.py
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/accelerator.py --models=centernet_student

# The demo's int8 model (of `make demo`) as an ONNX QDQ graph, checked in ONNX Runtime.
export: $(STAMP)
	$(BIN)/python -m jaxcomp.export --workdir=$(WORKDIR)/demo/int8 --format=onnx --int8 --check_map

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(WORKDIR)
