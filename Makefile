# lrtool's jobs. Each target creates the virtual environment it needs (.venv, torch pinned to the CPU wheel).
#   make demo    the main job (see README)
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
SEED ?= 1

.PHONY: demo test docs lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(LRTOOL) gen-data two-hop --seed $(SEED) -o $(DEMO)/world --force
	$(LRTOOL) gen-data math --seed $(SEED) -o $(DEMO)/math --force
	$(LRTOOL) train $(DEMO)/world/pretrain.jsonl --base tiny --full --vocab-from $(DEMO)/world \
		--until-accuracy 0.95 --seed $(SEED) -o $(DEMO)/base --force
	for expert in hop1 hop2 direct; do \
		$(LRTOOL) train $(DEMO)/world/$$expert.jsonl --base $(DEMO)/base --until-accuracy 0.95 \
			--seed $(SEED) -o $(DEMO)/$$expert --force || exit 1; \
	done
	$(LRTOOL) train $(DEMO)/world/hop1.jsonl $(DEMO)/world/hop2.jsonl --base $(DEMO)/base \
		--until-accuracy 0.95 --seed $(SEED) -o $(DEMO)/multitask --force
	$(LRTOOL) merge $(DEMO)/hop1 $(DEMO)/hop2 --method factor-avg -o $(DEMO)/merged-factor-avg --force
	$(LRTOOL) merge $(DEMO)/hop1 $(DEMO)/hop2 --method linear --weights 1,1 -o $(DEMO)/merged-sum --force
	$(LRTOOL) diagnose $(DEMO)/hop1 $(DEMO)/hop2 $(DEMO)/direct --base $(DEMO)/base --table \
		> $(DEMO)/diagnosis.json
	@echo "== Two-hop questions (training and held-out templates) and each hop's facts, every system:"
	$(LRTOOL) eval $(DEMO)/world/twohop.jsonl $(DEMO)/world/twohop.eval.jsonl $(DEMO)/world/hop1.jsonl \
		$(DEMO)/world/hop2.jsonl --base $(DEMO)/base --system base=base \
		$(foreach s,hop1 hop2 direct multitask,--system $(s)=adapter:$(DEMO)/$(s)) \
		--system factor-avg=adapter:$(DEMO)/merged-factor-avg --system sum=adapter:$(DEMO)/merged-sum \
		--by familiarity --by in_pretrain --score exact,loglik --reference base --seed $(SEED) \
		--predictions $(DEMO)/predictions.jsonl --plot $(DEMO)/eval.png -o $(DEMO)/eval.json --force \
		-q --table 2>&1
	@echo "== Report: $(DEMO)/eval.json, per-example predictions: $(DEMO)/predictions.jsonl, bars: $(DEMO)/eval.png"

docs: $(STAMP)
	$(PY) -m lrtool.docs .

lint: $(STAMP)
	$(VENV)/bin/ruff check lrtool tests benchmarks

bench: $(STAMP)
	@set -e; for script in $(wildcard benchmarks/*.py); do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
