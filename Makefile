# The two commands: `make run` and `make test`. Each does all of the set-up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-stamp
PROTOS := $(wildcard proto/txengine/v1/*.proto)
KERNELS := $(wildcard ext/*.pyx ext/*.pxd)
GEN_STAMP := engine/gen/.stamp
EXT_STAMP := engine/kernels/.build-stamp
SDK_STAMP := $(VENV)/.sdk-stamp
PYTEST_ARGS ?=

.PHONY: setup run test lint bench bench-fees capacity chaos clean

setup: $(STAMP) $(GEN_STAMP) $(EXT_STAMP) $(SDK_STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(GEN_STAMP): $(STAMP) $(PROTOS) scripts/gen_proto.py
	$(BIN)/python scripts/gen_proto.py
	touch $@

$(EXT_STAMP): $(STAMP) $(KERNELS) setup.py pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The client SDK (clients/python) generates its own stubs from proto/ when it is installed.
$(SDK_STAMP): $(STAMP) $(PROTOS) clients/python/setup.py clients/python/pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e clients/python
	touch $@

run: setup
	$(BIN)/txengine serve

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	npx --yes @bufbuild/buf@1.75.0 lint

bench: setup
	$(BIN)/txengine bench

# Fee kernel legs/s against its Fraction reference; plain vs three-leg fee transfers end to end.
bench-fees: setup
	$(BIN)/txengine bench-fees

# Stepped load, knee and sizing model; the report goes to bench-results/capacity/report.md.
CAPACITY_ARGS ?=
capacity: setup
	$(BIN)/txengine capacity $(CAPACITY_ARGS)

chaos: setup
	$(BIN)/python -m pytest -m chaos --run-slow tests/chaos

clean:
	rm -rf $(VENV) engine/gen build engine/kernels/*.so engine/kernels/.build-stamp .data \
		clients/python/src/txengine_client/_gen
