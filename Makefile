# Two commands on a fresh machine: `make serve` and `make test`. Each builds .venv first.
# TORCH_SPEC: with no torch in the venv, the CPU build is installed explicitly (a plain
# `pip install torch` would pull a multi-GB CUDA build). On an accelerator machine, install the
# vendor's torch into .venv first (or set TORCH_SPEC) and it is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv serve test test-fast lint conformance bench clean

venv: $(VENV)/.installed

# What serving needs: the runtime dependencies and the structured-output grammar engine (no test tools,
# no triton: `make serve` on a fresh machine stays a few hundred MB beside torch).
$(VENV)/.runtime: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[structured]'
	touch $@

# Everything `make test` needs on top: the dev extra and the out-of-tree vendor plugins.
$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev]'
	# The Cambricon and Moore Threads backends are out-of-tree plugins, installed as a vendor's
	# package would be (entry points); they report "unavailable" until their vendor stack is present.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e plugins/hwlayer-cambricon -e plugins/hwlayer-musa -e plugins/hwlayer-kunlun
	touch $@

serve: $(VENV)/.runtime
	$(PY) serve.py $(SERVE_ARGS)

# The full run CI uses. Triton's interpreter must be switched on before triton is first imported, so
# the Triton kernel tests and the Triton conformance run get processes of their own.
test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests conformance --ignore=tests/test_triton_kernels.py $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton_kernels.py
	TRITON_INTERPRET=1 $(PY) -m pytest -q conformance --backend triton --ignore-glob="*test_ep_*"
	# Vendor adapters against CPU emulators of their libraries' documented APIs (conformance/emulators),
	# one process per backend (the emulation lasts a session); about 1.5 minutes on 2 cores.
	for b in ascend cuda metax hygon cambricon musa kunlunxin iluvatar; do \
		$(PY) -m pytest -q conformance --backend $$b --emulated || exit 1; done

# The edit-run loop (under a minute on two cores): no servers, torchrun, subprocess pipelines or Triton
# interpreter (tests marked slow), conformance in fp32 only. `make test` before pushing.
# One torch thread: the tiny model gains nothing from more, and on a shared machine spinning OpenMP
# threads made this run twice as long.
test-fast: venv
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" --dtype fp32 tests conformance \
		--ignore=tests/test_triton_kernels.py $(PYTEST_ARGS)

# Third-party clients (langchain-openai, litellm: chat, streaming, structured output, named tools, the Responses
# API) against a real server, outside `make test`: they are not project dependencies, so they get a venv of their
# own under .cache/ (built on first use, needs PyPI; about 2 minutes). tests/clients/check_clients.py says what runs.
CLIENTS_VENV ?= .cache/clients-venv
.PHONY: test-clients
test-clients: venv
	test -x $(CLIENTS_VENV)/bin/python || ($(PYTHON) -m venv $(CLIENTS_VENV) && \
		$(CLIENTS_VENV)/bin/pip install -q langchain-openai litellm)
	OMP_NUM_THREADS=1 LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) tests/clients/run_clients.py \
		--python $(CLIENTS_VENV)/bin/python

conformance: venv
	$(PY) -m pytest -q conformance --backend $(or $(BACKEND),cpu)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
