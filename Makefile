# The README's two commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
SHARED_TFDS := $(abspath ../shared/tensorflow_datasets)
export TFDS_DATA_DIR ?= $(if $(wildcard $(SHARED_TFDS)),$(SHARED_TFDS),$(HOME)/tensorflow_datasets)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-slow lint bazel-test benchmark clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,benchmark]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/lenet_mnist.py

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check tfhybrid tests examples benchmarks
	$(VENV)/bin/ruff format --check tfhybrid tests examples benchmarks

bazel-test: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bazel test --config=offline //...

benchmark: $(VENV)/.installed
	$(PY) benchmarks/surgery_speed.py
	$(PY) benchmarks/mnist_hybrid.py

clean:
	rm -rf $(VENV) *.egg-info bazel-*
