# Every target installs what it needs into .venv first, every package at the version that
# constraints.txt pins (torch included), so installs are the same everywhere and pip never backtracks.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# -qq: errors only. Local wheel folders in a machine's pip config (extra-index-url) otherwise add a
# "Location ... is ignored" warning for each package they lack; failures still print in full.
# No build isolation: our build backend is the setuptools pinned here, not a fresh download.
PIP_INSTALL := $(VENV)/bin/pip install -qq --constraint constraints.txt
UV ?= uv

.PHONY: demo test test-slow lint bench lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@echo "installing the pinned dependencies into $(VENV) (first run only)"
	$(PIP_INSTALL) pip setuptools
	$(PIP_INSTALL) --no-build-isolation -e '.[test]'
	touch $(STAMP)

# Re-pin constraints.txt after changing dependencies in pyproject.toml: keeps every pin it can;
# `make lock UV_FLAGS=--upgrade` moves them all to the newest allowed releases. Needs uv
# (`pipx install uv`); it reads PyPI's metadata only, so it works without the local torch wheels.
lock:
	echo pip | $(UV) pip compile pyproject.toml - --extra test --universal --python-version 3.10 \
		--no-config --custom-compile-command "make lock" -q $(UV_FLAGS) -o constraints.txt

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.cli synthesize --config configs/demo_synthesize.yaml
	$(VENV)/bin/python -m jobs.cli caption --config configs/demo_caption.yaml

# The suite in two tiers (docs/development.md): `make test` is everything but the tests marked slow
# (whole jobs, clusters and servers run end to end); `make test-slow` is those. CI runs both.
test: $(STAMP)
	$(VENV)/bin/ruff check janus pipeline jobs training tests benchmarks
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.bench_engines

clean:
	rm -rf out .pytest_cache
