# `make demo` and `make test` work on a fresh machine with only Python >= 3.10:
# they create (or reuse) the virtual environment in $(VENV) and install the
# package with its test and example extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tf_transform_conv tests README.md

test-fast: $(STAMP)
	$(BIN)/python -m pytest tf_transform_conv tests README.md -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/layer_speed.py

clean:
	rm -rf $(VENV) runs build *.egg-info
