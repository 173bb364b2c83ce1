# ALL-ERP backup & DR. `make test` and `make run` are the two set-up commands (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test soak run stop shell venv system lint bench clean

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $(STAMP)

venv: $(STAMP)

system:
	bash include/scripts/ensure_system.sh

lint: venv
	$(VENV)/bin/ruff check plugins dags bench
	$(VENV)/bin/mypy

test: lint system
	$(VENV)/bin/pytest

# The compressed-time soak, longer than the week `make test` runs: `make soak SOAK_DAYS=60 SOAK_SEED=7`.
SOAK_DAYS ?= 28
SOAK_SEED ?= $(shell date +%s)
soak: venv system
	SOAK_DAYS=$(SOAK_DAYS) SOAK_SEED=$(SOAK_SEED) $(VENV)/bin/pytest tests/integration/test_soak.py -q --timeout=0

run: venv system
	bash include/scripts/run_local.sh

stop:
	bash include/scripts/run_local.sh stop

# A shell with the local estate's environment: `airflow ...`, `erp-restore ...`, `python -m erp_backup ...`.
shell: venv
	bash include/scripts/shell.sh

bench: venv system
	bash bench/run

clean:
	rm -rf $(VENV) .airflow .estate
