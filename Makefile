# Two commands on a fresh machine (README.md):  make run   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The service on embedded defaults: SQLite store, demo site, http://127.0.0.1:8000
run: $(STAMP)
	CDS_SITE_CONFIG=site_config $(BIN)/cds-service serve --host 127.0.0.1 --port 8000 --workers 2

# The whole test suite (needs the local PostgreSQL and Redis, see README.md)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var .pytest_cache
