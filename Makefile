# The two set-up commands of the README: `make demo` and `make test`. Both create or update the virtual
# environment first. VENV may point elsewhere (.ci/run keeps one in a cache folder keyed by the pins' hash).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements/ci.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deps-$(REQ_HASH)
PYTEST_ARGS ?=

.PHONY: install test test-fast test-slurm demo bench clean

$(STAMP): requirements/ci.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/ci.txt
	@rm -f $(VENV)/.deps-*; touch $@

install: $(STAMP)
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

test: install
	$(PY) -m pytest -q -m "not slurm" $(PYTEST_ARGS) tests

# The edit-test loop: everything but the tests marked slow (several processes, the demo, fault injection).
test-fast: install
	$(PY) -m pytest -q -m "not slurm and not slow" $(PYTEST_ARGS) tests

# A real SLURM cluster on this machine (root; Debian packages): 2 slurmd nodes, slurmdbd for sacct, a low
# MaxArraySize so that array splitting is exercised. The cluster is always stopped; pytest's exit code is kept.
SLURM_UP ?= NODES=2 WITH_SLURMDBD=1 MAX_ARRAY_SIZE=5
test-slurm: install
	@trap 'bash cpcluster/cluster/slurm-down.sh' EXIT; trap 'exit 130' INT TERM; \
	$(SLURM_UP) bash cpcluster/cluster/slurm-up.sh && \
	CPCLUSTER_REQUIRE_SLURM=1 $(PY) -m pytest -q -m slurm $(PYTEST_ARGS) tests/slurm

demo: install
	$(VENV)/bin/cpcluster demo

clean:
	rm -rf build *.egg-info .pytest_cache demo-out
