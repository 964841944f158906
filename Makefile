# Two entry points on a fresh Debian 12 machine (as root, or with sudo rights):
#   make run   - install what the milter needs and run it on docs/examples/ipv6milter.conf
#   make test  - install what the tests need (Postfix, Knot DNS included) and run every test

PYTHON   ?= /usr/bin/python3
VENV     := .venv
BIN      := $(VENV)/bin
CONF     ?= docs/examples/ipv6milter.conf
SPF_SUITE := .cache/pyspf/rfc7208-tests.yml
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages: building pymilter needs libmilter and the Python headers;
# the integration tests run a real Postfix and a real authoritative DNS server (Knot).
APT_RUN  := python3 python3-venv python3-dev gcc libmilter-dev
# Building and checking the distro packages (make deb, make rpm, man, and the
# tests in tests/packaging, which also run the unit tests on Debian's libraries).
APT_DEB  := build-essential debhelper dh-python pybuild-plugin-pyproject python3-all \
            python3-setuptools python3-wheel lintian
APT_RPM  := rpm rpm2cpio cpio python3-build python3-installer python3-setuptools python3-wheel
APT_MAN  := groff-base man-db systemd
APT_PACKAGING := $(APT_DEB) $(APT_RPM) $(APT_MAN) python3-pytest python3-pytest-timeout python3-hypothesis
# The clean-root package test (tests/packaging/test_cleanroot.py): mmdebstrap
# builds a minimal Debian 12, systemd-nspawn boots it.
APT_CLEANROOT := mmdebstrap systemd-container
APT_TEST := $(APT_RUN) postfix knot iproute2 openssl m4 prometheus $(APT_PACKAGING) \
            $(APT_CLEANROOT)

.PHONY: run test lint unit integration deps-run deps-test clean deb rpm man

run: deps-run $(VENV)/.installed
	$(BIN)/ipv6milter -c $(CONF)

test: deps-test $(VENV)/.test-installed $(SPF_SUITE)
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

# The openspf RFC 7208 test suite (tests/conformance/test_rfc7208.py), from the
# source distribution of the pyspf that is installed; kept in .cache/, never
# committed.
$(SPF_SUITE): | $(VENV)/.test-installed
	@v=$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("pyspf"))') && \
	  rm -rf .cache/pyspf/sdist && mkdir -p .cache/pyspf/sdist && \
	  $(BIN)/pip download -q --no-deps --no-binary :all: -d .cache/pyspf/sdist "pyspf==$$v" && \
	  tar -xzf .cache/pyspf/sdist/pyspf-$$v.tar.gz -O pyspf-$$v/test/rfc7208-tests.yml > $@.tmp && \
	  mv $@.tmp $@ && echo "$@: from pyspf $$v's sdist"

# -- distro packages -----------------------------------------------------------
#   make deb   build dist/ipv6milter_VERSION-1_all.deb (dpkg-buildpackage, packaging/debian)
#   make rpm   build dist/ipv6milter-VERSION-1.noarch.rpm (rpmbuild --nodeps: Fedora's
#              dependencies cannot be installed on Debian)
#   make man   check the man pages in docs/man (groff warnings are errors)
# Both builds start from a clean copy of the working tree (tracked and new files,
# not ignored ones: uncommitted changes are included, .venv and dist are not) in
# PKGBUILD, and run with the system's PATH so that Debian's /usr/bin/python3 builds.

VERSION  := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' ipv6milter/__init__.py)
PKGBUILD ?= build/pkg
DIST     ?= dist
override PKGBUILD := $(abspath $(PKGBUILD))
override DIST := $(abspath $(DIST))
SYSENV   := env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
TREE_FILES = { git ls-files -co --exclude-standard 2>/dev/null \
	  || find . \( -name .git -o -name .venv -o -name build -o -name dist \) -prune \
	     -o -type f -print | sed 's|^\./||'; } \
	| while IFS= read -r f; do [ -f "$$f" ] && printf '%s\n' "$$f"; done
COPY_TREE = $(TREE_FILES) | tar -cf - -T - | tar -xf - -C

deb:
	@bash packaging/apt-install.sh $(APT_DEB)
	@v=$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version); \
	  case "$$v" in $(VERSION)-*) ;; *) echo "packaging/debian/changelog: $$v, ipv6milter/__init__.py: $(VERSION)"; exit 1;; esac
	rm -rf $(PKGBUILD)/deb
	mkdir -p $(PKGBUILD)/deb/ipv6milter-$(VERSION) $(DIST)
	$(COPY_TREE) $(PKGBUILD)/deb/ipv6milter-$(VERSION)
	cp -a packaging/debian $(PKGBUILD)/deb/ipv6milter-$(VERSION)/debian
	cd $(PKGBUILD)/deb/ipv6milter-$(VERSION) && $(SYSENV) dpkg-buildpackage -us -uc -b
	cp $(PKGBUILD)/deb/ipv6milter_$(VERSION)-*_all.deb $(PKGBUILD)/deb/ipv6milter_$(VERSION)-*.changes \
	   $(PKGBUILD)/deb/ipv6milter_$(VERSION)-*.buildinfo $(DIST)/
	@ls -l $(DIST)/ipv6milter_$(VERSION)-*_all.deb

rpm:
	@bash packaging/apt-install.sh $(APT_RPM)
	@v=$$(sed -n 's/^Version: *//p' packaging/rpm/ipv6milter.spec); \
	  [ "$$v" = "$(VERSION)" ] || { echo "packaging/rpm/ipv6milter.spec: $$v, ipv6milter/__init__.py: $(VERSION)"; exit 1; }
	rm -rf $(PKGBUILD)/rpm
	mkdir -p $(PKGBUILD)/rpm/SOURCES $(PKGBUILD)/rpm/ipv6milter-$(VERSION) $(DIST)
	$(COPY_TREE) $(PKGBUILD)/rpm/ipv6milter-$(VERSION)
	tar -czf $(PKGBUILD)/rpm/SOURCES/ipv6milter-$(VERSION).tar.gz -C $(PKGBUILD)/rpm ipv6milter-$(VERSION)
	cp packaging/systemd/ipv6milter.sysusers $(PKGBUILD)/rpm/SOURCES/
	$(SYSENV) rpmbuild -bb --nodeps --define '_topdir $(PKGBUILD)/rpm' packaging/rpm/ipv6milter.spec
	cp $(PKGBUILD)/rpm/RPMS/noarch/ipv6milter-$(VERSION)-*.noarch.rpm $(DIST)/
	@ls -l $(DIST)/ipv6milter-$(VERSION)-*.noarch.rpm

man:
	@bash packaging/apt-install.sh $(APT_MAN)
	@for f in docs/man/*.[158]; do \
	  out=$$(groff -ww -z -man "$$f" 2>&1; MANWIDTH=80 man --warnings -l "$$f" 2>&1 >/dev/null); \
	  if [ -n "$$out" ]; then echo "$$f:"; echo "$$out"; exit 1; fi; echo "$$f: ok"; done

# -- benchmark (not part of make test) -------------------------------------------
#   make bench   ipv6milter beside OpenDKIM, dkimpy-milter and pyspf-milter through a
#                private Postfix (bench/run.py; ~11 minutes, root); writes
#                bench/results.md, bench/results.png; analysis in docs/performance.md
APT_BENCH := postfix knot openssl util-linux opendkim dkimpy-milter pyspf-milter rspamd

.PHONY: bench
bench: deps-run $(VENV)/.test-installed $(VENV)/.bench-installed
	@bash packaging/apt-install.sh $(APT_BENCH)
	$(BIN)/python -m bench.run

$(VENV)/.bench-installed: $(VENV)/bin/python
	$(BIN)/pip install -q matplotlib py-spy
	touch $@
