# `make demo` and `make test` work on a fresh machine with only Python >= 3.10:
# they create (or reuse) the virtual environment in $(VENV) and install the
# package with its test and example extras. `make docs` does the same for the
# documentation in its own environment, $(DOCS_VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

# The site needs only MkDocs and its plugins, the `docs` extra of setup.cfg,
# not the package: mkdocstrings reads the source without importing it, so
# this environment has no TensorFlow. pip cannot install an extra without its
# package, so the extra's lines are read from setup.cfg.
DOCS_VENV ?= .venv-docs
DOCS_BIN := $(DOCS_VENV)/bin
DOCS_STAMP := $(DOCS_VENV)/.installed-stamp
DOCS_EXTRA := import configparser; c = configparser.ConfigParser(interpolation=None); \
	c.read("setup.cfg"); print(c["options.extras_require"]["docs"])

.PHONY: demo test test-fast docs bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

$(DOCS_STAMP): setup.cfg
	test -x $(DOCS_BIN)/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_BIN)/python -m pip install --quiet --upgrade pip
	$(DOCS_BIN)/python -c '$(DOCS_EXTRA)' > $(DOCS_VENV)/requirements.txt
	$(DOCS_BIN)/python -m pip install --quiet -r $(DOCS_VENV)/requirements.txt
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_demo.py

# The test suite, the README's and the documentation pages' `>>>` examples,
# in TEST_WORKERS processes (pytest-xdist; a file's tests share a process, so
# its module fixtures are built once).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) tf_transform_conv tests README.md docs

test-fast: $(STAMP)
	$(PYTEST) tf_transform_conv tests README.md docs -m "not slow"

# The site in site/; --strict turns every warning (a broken link, anchor or
# API reference) into a failure. NO_MKDOCS_2_WARNING drops a banner that
# mkdocs-material prints on every build about its own end of life.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(DOCS_BIN)/python -m mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/layer_speed.py

clean:
	rm -rf $(VENV) $(DOCS_VENV) site runs build *.egg-info
