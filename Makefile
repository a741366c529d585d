PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint bench clean

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
	$(PY) -m pytest -q -n 2 tests

lint: venv
	$(VENV)/bin/ruff check btkjax tests benchmarks

bench: venv
	$(PY) benchmarks/bench_render.py

clean:
	rm -rf $(VENV) demo_output
