# Two entry points on a fresh machine: `make demo` and `make test`. Each builds .venv first,
# with the test and bench extras (tests/test_bench_peer.py runs the bench's PyTorch peer; both
# extras pin torch to its CPU build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# Tests run on 8 forced host devices, two test files at a time (one per core): most of a
# test's time is single-threaded XLA compilation. The slowest files go first, in the order
# tests/conftest.py gives them (--no-loadscope-reorder), so that no long file starts last.
PYTEST_FLAGS ?= -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lumiere demo --workdir demo_out

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_FLAGS) tests

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.bench_train
	$(PY) -m bench.bench_t5
	$(PY) -m bench.bench_data
	$(PY) -m bench.bench_sample
	$(PY) -m bench.bench_peer

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
