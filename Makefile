# One set of checks for developers and CI.  `make check` = lint + types + unit tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: check lint types imports unit test spank clean

check: lint types imports unit

lint:
	$(VENV)/bin/ruff check hpcstage devcluster tests benchmarks scripts/*.py
	$(VENV)/bin/ruff format --check hpcstage devcluster tests benchmarks

types:
	$(VENV)/bin/mypy

imports:
	$(VENV)/bin/lint-imports --no-cache

unit:
	$(PY) -m pytest -q tests/unit

# Everything, including integration tests on the real local cluster (needs root).
test:
	./scripts/test

spank:
	$(MAKE) -C spank_plugin

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
