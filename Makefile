# coorddet: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_RUNS := runs/demo
DEMO_REPORT := reports/demo

.PHONY: install demo paper test lint format bench clean

# Re-install only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -f $(DEMO_DATA)/dataset.json || $(BIN)/python -m data_gen --out $(DEMO_DATA) --train 2000 --val 250 --test 500 --quiet
	$(BIN)/python train.py --config configs/demo.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/baseline --no-coordconv --overwrite --quiet
	$(BIN)/python train.py --config configs/demo.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/coordconv --coordconv --overwrite --quiet
	$(BIN)/python -m coorddet.evaluate --data $(DEMO_DATA) --split test --out $(DEMO_REPORT) --overwrite \
		$(DEMO_RUNS)/baseline/checkpoints/best.ckpt $(DEMO_RUNS)/coordconv/checkpoints/best.ckpt

# The paper reproduction: 3 seeds x (baseline, CoordConv) on the uniform and quadrant
# splits plus the with_r ablation; about 1 h on 2 CPU cores. Writes results/paper_repro.{json,md}.
# Then the released protocol and its ladder R0-R5: results/paper_protocol.{json,md},
# several hours on 2 CPU cores. Rerun to continue either after an interruption.
paper: $(STAMP)
	$(BIN)/python experiments/paper_repro.py
	$(BIN)/python experiments/paper_protocol.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Speed on this machine (benchmarks/run.py): prints a table and writes reports/bench.json; ~2 minutes
# (QUICK=1: under 1). Run it on an otherwise idle machine.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(if $(QUICK),--quick) --out reports/bench.json

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUNS) $(DEMO_REPORT) .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
