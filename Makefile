# make demo: run the main job on the embedded default; make test: the whole test suite;
# make lint: ruff and the package's import layers (pyproject.toml [tool.importlinter]).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install test demo lint
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=25 $(PYTEST_ARGS)

demo: install
	$(PY) -m hyperlora_jax.cli demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache pyproject.toml
