# FieldSync: `make run` sets everything up and runs both services; `make test`
# sets everything up and runs the test suite. Both install into .venv/ first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/fieldsync/v1/*.proto)
GEN_STAMP := fieldsync/v1/.generated-stamp
RUN_DIR := .run

.PHONY: install gen check-gen run demo test soak-text lint fmt proto-lint clean

install: $(STAMP) $(GEN_STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FieldSync needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

$(GEN_STAMP): $(STAMP) $(PROTOS) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	@touch $@

gen: $(STAMP)
	$(PY) scripts/gen_protos.py

check-gen: install
	$(PY) scripts/gen_protos.py --check

run: install
	@mkdir -p $(RUN_DIR)
	@test -s $(RUN_DIR)/jwt-secret || $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(RUN_DIR)/jwt-secret
	@FIELDSYNC_JWT_SECRET=$$(cat $(RUN_DIR)/jwt-secret) $(PY) scripts/run_dev.py

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q

# Issue 16's acceptance run: 8 clients editing one page for 30 s, on SQLite and on three
# PostgreSQL instances (FIELDSYNC_TEST_PG_URL); `make test` runs the same for 2 s.
soak-text: install
	FIELDSYNC_TEXT_SOAK_SECONDS=30 $(PY) -m pytest -q tests/test_text_soak.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .
	$(PY) scripts/gen_protos.py --check

fmt: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

proto-lint:
	bash scripts/buf_lint.sh

# The benchmark (bench/README.md): real services on throwaway databases, a table on
# stdout and bench/results/latest.json. BENCH_QUICK=1 checks the harness in ~2 minutes.
.PHONY: bench
bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(RUN_DIR) fieldsync/v1/*_pb2*.py fieldsync/v1/*_pb2*.pyi $(GEN_STAMP)
