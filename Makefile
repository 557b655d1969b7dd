# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[dev]'
	$(VPY) -c "import rnnkit._fused as f; f.build()" || echo "fused kernel not built; the engine uses its pure-torch path"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m rnnkit forecast --out runs/demo

test: $(STAMP)
	$(VPY) -m pytest -n 2 tests

bench: $(STAMP)
	$(VPY) benchmarks/bench_layers.py --out docs/benchmarks.md --json docs/benchmarks.json

clean:
	rm -rf $(VENV) .pytest_cache
