# lrtool's jobs. Each target creates the virtual environment it needs (.venv, torch pinned to the CPU wheel).
#   make demo    the main job: the paper's two-hop experiment, 3 seeds (see README)
#   make demo-math, make demo-theory   the math word problems; the key-value memory check
#   make test    the test suite, serially, torch capped to one thread a process
#   make docs    regenerate man/ and completions/ from the CLI
#   make lint    ruff
#   make bench   the side-by-side benchmarks in benchmarks/

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LRTOOL := $(VENV)/bin/lrtool
STAMP := $(VENV)/.installed-lrtool
DEMO ?= demo-out
JOBS ?= 2

.PHONY: demo demo-math demo-theory test docs lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

# The paper's two-hop experiment (examples/two-hop/Makefile): its variables (SEEDS, SIZE, BASE, CHAT, DIST,
# UNTIL...) pass through; DEMO is the output directory.
demo: $(STAMP)
	$(MAKE) -C examples/two-hop -j$(JOBS) LRTOOL=$(abspath $(LRTOOL)) OUT=$(abspath $(DEMO))

# Skill composition in math word problems, plain and with the shared solution template.
demo-math: $(STAMP)
	$(MAKE) -C examples/math -j$(JOBS) LRTOOL=$(abspath $(LRTOOL)) OUT=$(abspath $(DEMO))/math

# The paper's formal claim on a one-layer key-value memory (seconds).
demo-theory: $(STAMP)
	$(PY) examples/theory/kv_memory.py

docs: $(STAMP)
	$(PY) -m lrtool.docs .

lint: $(STAMP)
	$(VENV)/bin/ruff check lrtool tests benchmarks examples

bench: $(STAMP)
	@set -e; for script in $(wildcard benchmarks/*.py); do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
