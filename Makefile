# ALL-ERP backup & DR. `make test` and `make run` are the two set-up commands (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test run stop venv system lint bench clean

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

run: venv system
	bash include/scripts/run_local.sh

stop:
	bash include/scripts/run_local.sh stop

bench: venv system
	bash bench/run

clean:
	rm -rf $(VENV) .airflow .estate
