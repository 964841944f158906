# Two entry points on a fresh Debian 12 machine (as root, or with sudo rights):
#   make run   - install what the milter needs and run it on docs/examples/ipv6milter.conf
#   make test  - install what the tests need (Postfix, Knot DNS included) and run every test

PYTHON   ?= /usr/bin/python3
VENV     := .venv
BIN      := $(VENV)/bin
CONF     ?= docs/examples/ipv6milter.conf
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages: building pymilter needs libmilter and the Python headers;
# the integration tests run a real Postfix and a real authoritative DNS server (Knot).
APT_RUN  := python3 python3-venv python3-dev gcc libmilter-dev
APT_TEST := $(APT_RUN) postfix knot iproute2 openssl prometheus

.PHONY: run test lint unit integration deps-run deps-test clean

run: deps-run $(VENV)/.installed
	$(BIN)/ipv6milter -c $(CONF)

test: deps-test $(VENV)/.test-installed
	$(BIN)/ruff check ipv6milter tests
	$(BIN)/python -m pytest -ra tests

unit: $(VENV)/.test-installed
	$(BIN)/python -m pytest -ra tests/unit

integration: deps-test $(VENV)/.test-installed
	$(BIN)/python -m pytest -ra tests/integration

lint: $(VENV)/.test-installed
	$(BIN)/ruff check ipv6milter tests

# Install only what is missing, so repeated runs cost nothing.  postfix asks
# debconf questions; "No configuration" leaves the system instance alone (the
# tests start private instances of their own).
deps-run:
	@bash packaging/apt-install.sh $(APT_RUN)

deps-test:
	@bash packaging/apt-install.sh $(APT_TEST)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python setup.cfg setup.py
	$(BIN)/pip install -q .
	touch $@

$(VENV)/.test-installed: $(VENV)/bin/python setup.cfg setup.py
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) build dist *.egg-info
