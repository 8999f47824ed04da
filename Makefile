# Every target installs what it needs into .venv first (torch is pinned in pyproject.toml).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.cli synthesize --config configs/demo_synthesize.yaml
	$(VENV)/bin/python -m jobs.cli caption --config configs/demo_caption.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check janus pipeline jobs tests benchmarks
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.bench_engines

clean:
	rm -rf out .pytest_cache
