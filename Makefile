# FieldSync: `make run` sets everything up and runs both services; `make test`
# sets everything up and runs the test suite. Both install into .venv/ first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/fieldsync/v1/*.proto)
GEN_STAMP := fieldsync/v1/.generated-stamp
RUN_DIR := .run
# The TypeScript client (clients/typescript): its npm dependencies, when npm is here.
TS_DIR := clients/typescript
TS_STAMP := $(TS_DIR)/node_modules/.installed-stamp
HAVE_NPM := $(shell command -v npm >/dev/null 2>&1 && echo yes)

.PHONY: install gen check-gen config-doc run run-tls demo test soak-text lint fmt proto-lint clean ts-install ts-test ts-lint ts-gen

install: $(STAMP) $(GEN_STAMP) ts-install

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FieldSync needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

$(GEN_STAMP): $(STAMP) $(PROTOS) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	@touch $@

# npm ci from the committed package-lock.json; no npm (a machine without Node): skipped.
ts-install:
ifeq ($(HAVE_NPM),yes)
	@$(MAKE) --no-print-directory $(TS_STAMP)
else
	@echo "== npm not found: the TypeScript client (clients/typescript) is skipped; install Node 20+ to build and test it"
endif

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	cd $(TS_DIR) && npm ci --silent --no-audit --no-fund
	@touch $@

# The TypeScript tests (node --test) start real services from .venv, so they need install.
ts-test: install
ifeq ($(HAVE_NPM),yes)
	cd $(TS_DIR) && npm test --silent
else
	@echo "== npm not found: TypeScript tests skipped"
endif

# tsc --noEmit (strict) and the stale-stub check of the committed TypeScript stubs.
ts-lint: install
ifeq ($(HAVE_NPM),yes)
	cd $(TS_DIR) && npm run --silent lint && npm run --silent check-gen
else
	@echo "== npm not found: TypeScript lint skipped"
endif

# Regenerate the committed TypeScript stubs after a proto change.
ts-gen: ts-install
	cd $(TS_DIR) && npm run --silent gen

gen: $(STAMP)
	$(PY) scripts/gen_protos.py

check-gen: install
	$(PY) scripts/gen_protos.py --check

# docs/configuration.md, from the configuration dataclasses (tests/test_config_doc.py checks it).
config-doc: install
	$(PY) scripts/gen_config_doc.py

# The development key is readable by its owner only (0600), in a folder only its owner
# can enter; `make run RUN_DIR=path` keeps everything somewhere else.
run: install
	@mkdir -p -m 700 $(RUN_DIR)
	@test -s $(RUN_DIR)/jwt-secret || (umask 077 && $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(RUN_DIR)/jwt-secret)
	@chmod 600 $(RUN_DIR)/jwt-secret
	@FIELDSYNC_JWT_SECRET=$$(cat $(RUN_DIR)/jwt-secret) $(PY) scripts/run_dev.py --run-dir $(RUN_DIR)

# The same over TLS: a development CA and certificates made in .run/tls/, mutual TLS
# between the services (docs/operations.md).
run-tls: install
	@mkdir -p -m 700 $(RUN_DIR)
	@test -s $(RUN_DIR)/jwt-secret || (umask 077 && $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(RUN_DIR)/jwt-secret)
	@chmod 600 $(RUN_DIR)/jwt-secret
	@FIELDSYNC_JWT_SECRET=$$(cat $(RUN_DIR)/jwt-secret) $(PY) scripts/run_dev.py --run-dir $(RUN_DIR) --tls

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q
	@$(MAKE) --no-print-directory ts-test

# Issue 16's acceptance run: 8 clients editing one page for 30 s, on SQLite and on three
# PostgreSQL instances (FIELDSYNC_TEST_PG_URL); `make test` runs the same for 2 s.
soak-text: install
	FIELDSYNC_TEXT_SOAK_SECONDS=30 $(PY) -m pytest -q tests/test_text_soak.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .
	$(PY) scripts/gen_protos.py --check
	@$(MAKE) --no-print-directory ts-lint

fmt: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

proto-lint:
	bash scripts/buf_lint.sh

# The benchmark (bench/README.md): real services on throwaway databases, a table on
# stdout and bench/results/latest.json. BENCH_QUICK=1 checks the harness: ~35 s on a quiet
# machine, over 2 minutes when the cores are shared.
# Issue 21's slow fault cases (kill -9, lost PostgreSQL connections, a full disk on a
# tmpfs): a table of faults injected and acknowledged writes lost / doubled (0 / 0).
# Set FIELDSYNC_TEST_PG_URL for the PostgreSQL case; the tmpfs case needs root.
.PHONY: chaos
chaos: install
	$(PY) scripts/chaos.py

.PHONY: bench
bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(RUN_DIR) fieldsync/v1/*_pb2*.py fieldsync/v1/*_pb2*.pyi $(GEN_STAMP)
	rm -rf $(TS_DIR)/node_modules $(TS_DIR)/dist
