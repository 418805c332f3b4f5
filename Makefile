# Two commands on a fresh machine (README.md):  make run   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-shifted test-tools lint models bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The service on embedded defaults: SQLite store, demo site, http://127.0.0.1:8000; elsewhere
# with `make run PORT=8001 HOST=0.0.0.0 WORKERS=4`. Set with := (not ?=) so that a HOST or PORT
# the shell happens to export does not move it. `exec`: gunicorn replaces the recipe's shell, so
# signals sent to the process make started reach the master. The demo's tokens name the URL it
# listens on (CDS_PUBLIC_URL: a JWT's `aud` is checked against configuration, never the Host),
# and its development key and sandbox are turned on here, explicitly (CDS_ALLOW_DEV_KEYS): a
# deployment (the Docker image, a pod) has neither unless its operator says so.
HOST    := 127.0.0.1
PORT    := 8000
WORKERS := 2
run: $(STAMP)
	CDS_SITE_CONFIG=site_config CDS_PUBLIC_URL=http://$(HOST):$(PORT) CDS_ALLOW_DEV_KEYS=true \
	  exec $(BIN)/cds-service serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# The whole test suite (needs the local PostgreSQL and Redis, see README.md), then again with
# the clock moved ahead.
test: $(STAMP) test-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-shifted

# The suite with the wall clock ~3 years ahead, in this process and in every server it starts
# (tests/clockshift/sitecustomize.py): a date written into a test, or test data that ages out of
# a look-back window, fails today instead of on the day the calendar gets there. time-machine is
# imported before pytest, which then warns that it cannot assert-rewrite it: harmless.
CLOCK_SHIFT ?= +1100d
test-shifted: $(STAMP) test-tools
	TEST_CLOCK_SHIFT=$(CLOCK_SHIFT) PYTHONPATH=$(CURDIR)/tests/clockshift \
	  $(BIN)/python -m pytest -p no:cacheprovider -W ignore::pytest.PytestAssertRewriteWarning

# System tools tests run as subprocesses, from Debian packages; one `command -v X || install` line
# each. promtool (package prometheus) checks ops/prometheus/; chromium runs the browser tests
# (tests/helpers/browser.py: the sandbox and /docs pages) through Playwright.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
apt_install = $(APT_GET) install -y --no-install-recommends $(1) \
	|| { $(APT_GET) update && $(APT_GET) install -y --no-install-recommends $(1); }
# Debian's postinst starts (and enables) a prometheus server on *:9090 wherever an init system lets
# it, i.e. unless /usr/sbin/policy-rc.d forbids as in most containers; tests only want promtool.
no_prometheus_server = $(SUDO) sh -c 'systemctl disable --now prometheus; service prometheus stop; true' \
	>/dev/null 2>&1
test-tools:
	command -v promtool >/dev/null || { $(call apt_install,prometheus) && $(no_prometheus_server); }
	test -x /usr/bin/chromium || $(call apt_install,chromium)

# Rebuild the shipped models from the synthetic cohort (models/README.md).
COHORT := var/cohort
models: $(STAMP)
	$(BIN)/cds-service models generate-cohort --out $(COHORT) --patients 4000 --seed 20261121
	for id in kfre-4var ckd-progression-lr; do \
	  $(BIN)/cds-service models train --ndjson $(COHORT) --labels $(COHORT)/labels.csv \
	    --spec models/specs/$$id.yaml --out models/$$id --replace || exit 1; \
	done

# HTTP benchmark: the service (1 and 2 workers) against a floor Flask app, a few minutes
# (README.md, "Benchmark"); results in bench/results/service.{json,md}.
bench: $(STAMP)
	$(BIN)/python -m bench.service_bench

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var .pytest_cache
