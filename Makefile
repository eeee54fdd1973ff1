# fastbert: `make test` and `make bench` each set up everything on a fresh machine (a .venv, torch
# and the dependencies, the compiled extension) and then run. A second run rebuilds only what changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
# What the build depends on besides the sources; a change re-runs the (incremental) build.
BUILD_ENV := FASTBERT_BUILD_CUDA=$(FASTBERT_BUILD_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) CUDA_HOME=$(CUDA_HOME)

.PHONY: test bench info build clean FORCE lint format

test: $(VENV)/.built
	$(PY) -m pytest -q tests

bench: $(VENV)/.built
	$(VENV)/bin/fastbert bench --quick --out benchmarks/results

info: $(VENV)/.built
	$(PY) -m fastbert info

build: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Build requirements first (setup.py imports torch), then the package with its runtime and test
# dependencies. pip's build isolation would build against a second torch: hence --no-build-isolation.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PIP) install $$($(PY) -c "import re; r = re.search(r'requires = \[(.*?)\]', open('pyproject.toml').read()).group(1); print(' '.join(q.strip().strip('\"') for q in r.split(',')))")
	touch $@

$(VENV)/.build-env: FORCE | $(PY)
	@echo '$(BUILD_ENV)' | cmp -s - $@ || echo '$(BUILD_ENV)' > $@

$(VENV)/.built: $(VENV)/.deps $(VENV)/.build-env $(SOURCES)
	$(PIP) install --no-build-isolation -e ".[all]"
	touch $@

clean:
	rm -rf build fastbert/_C*.so *.egg-info $(VENV)/.built

# Lint and format: ruff (config in pyproject.toml) for Python, clang-format (.clang-format) for csrc/.
# `make lint` checks and changes nothing; `make format` applies the fixes and the formatting.
RUFF_VERSION := 0.17.6
CLANG_FORMAT_VERSION := 23.1.5
CSRC_FORMAT := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null | sort)

$(VENV)/.lint-$(RUFF_VERSION)-$(CLANG_FORMAT_VERSION): | $(PY)
	$(PIP) install -q ruff==$(RUFF_VERSION) clang-format==$(CLANG_FORMAT_VERSION)
	touch $@

lint: $(VENV)/.lint-$(RUFF_VERSION)-$(CLANG_FORMAT_VERSION)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC_FORMAT)

format: $(VENV)/.lint-$(RUFF_VERSION)-$(CLANG_FORMAT_VERSION)
	$(VENV)/bin/ruff check --fix --exit-zero .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CSRC_FORMAT)
