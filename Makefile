# Two entry points on a fresh machine: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# Tests use the 8 forced host devices; keep BLAS/Eigen from oversubscribing 2 cores.
PYTEST_FLAGS ?= -q -x --durations=15

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lumiere demo --workdir demo_out

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_FLAGS) tests

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
