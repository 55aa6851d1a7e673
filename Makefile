# Two commands do all set-up on a fresh machine:
#   make demo   - the main job: trains the reference models, diagnoses, fixes, writes TensorBoard logs
#   make test   - the test suite
# Both create $(VENV) on first use. TORCH is pinned to the CPU build; override it for GPUs,
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gradwatch-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[lightning,dev,transformers]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradwatch demo $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
