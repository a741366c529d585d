PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint bench bench-btk bench-all clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/btkjax demo --out demo_output

test: venv
	$(PY) -m pytest -q -n 2 --durations=15 tests

lint: venv
	$(VENV)/bin/ruff check btkjax tests benchmarks

bench: venv
	$(PY) benchmarks/bench_render.py

clean:
	rm -rf $(VENV) demo_output

# BTK 1.0.9 in its own environment, for benchmarks/bench_generator.py (not needed by tests).
.bench-btk/.installed:
	$(PYTHON) -m venv .bench-btk
	.bench-btk/bin/python -m pip install --quiet blending-toolkit==1.0.9 "numpy<2.4"
	touch $@

bench-btk: .bench-btk/.installed

bench-all: venv bench-btk
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_generator.py
