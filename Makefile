# `make demo` and `make test` create .venv and install what they need when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-core
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch lies on this disk; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Anchors for the benchmarks. k-diffusion is installed without its dependencies: they pull torchvision, which
# in turn pulls another torch build; its samplers need only torchsde, torchdiffeq, scipy, safetensors, Pillow.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $@

demo: $(STAMP)
	$(PY) -m diffkit.cli demo --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(BENCH_STAMP)
	$(PY) bench/solvers.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
