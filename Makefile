SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
KAFKA_VERSION ?= 3.9.2
export KAFKA_VERSION

VENV := .venv
STAMP := $(VENV)/.stamp
RUFF := $(VENV)/bin/ruff check .
MYPY := $(VENV)/bin/mypy

.PHONY: help venv jars up down run test lint bench clean

help:
	@echo "make venv   create .venv and install the project with its dev extras"
	@echo "make jars   download the Kafka $(KAFKA_VERSION) jars (Maven Central)"
	@echo "make up     start Kafka and PostgreSQL, write .local/env"
	@echo "make down   stop them"
	@echo "make run    up, then run the service in the foreground (Ctrl-C stops it)"
	@echo "make test   up, lint, then the test suite"
	@echo "make lint   ruff and mypy"
	@echo "make bench  up, then the benchmark"
	@echo "make clean  down, then remove .local and .venv"

venv: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev]'
	touch $@

jars:
	infra/kafka.sh fetch

up:
	infra/up.sh

down:
	infra/down.sh

# make run, make test and make bench run on the development secrets, explicitly (a
# production environment, the default, refuses them; see README "Secrets in production").
run: venv up
	BIZ_ENVIRONMENT=development $(VENV)/bin/bizcenter run

# Lint first and pytest last, so that the run ends with pytest's summary; both always run.
# (The lint commands are repeated rather than run as `$(MAKE) lint`: a recipe line holding
# $(MAKE) is executed even by `make -n`.)
test: venv up
	lint_rc=0; $(RUFF) || lint_rc=1; $(MYPY) || lint_rc=1; \
	test_rc=0; BIZ_ENVIRONMENT=development $(VENV)/bin/python -m pytest || test_rc=$$?; \
	if (( lint_rc != 0 )); then echo "make test: lint FAILED (see above)" >&2; fi; \
	exit $$(( test_rc != 0 ? test_rc : lint_rc ))

lint: venv
	rc=0; $(RUFF) || rc=1; $(MYPY) || rc=1; exit $$rc

bench: venv up
	BIZ_ENVIRONMENT=development $(VENV)/bin/python -m bench

clean: down
	rm -rf .local $(VENV)
