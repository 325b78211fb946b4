# hoodyproxy developer and CI entry points (GNU make).
#
#   make venv            create .venv and install the project editable with its test extras
#   make run-venv        create .venv and install the project editable, without the test extras
#   make deps            install the Debian packages the tests use (root only; else just report)
#   make test            run the Trial suite      (TESTS=tests.test_demo TRIAL_ARGS=--debug ...);
#                        the reporter (TRIAL_REPORTER=durations) ends with the ten slowest tests
#   make run             twistd -n hoodyproxy     (ARGS='--config ...'); as root it installs
#                        netfilter rules and routes, which a clean stop removes (README.rst)
#   make demo            twistd -n hoodyproxy --demo
#   make bench           run the benchmark harness: python -m bench (ARGS='--quick', '--only tls', ...);
#                        installs the project with its test and bench extras,
#                        and DEBIAN_BENCH_PACKAGES first when run as root
#   make clean           remove build and test leftovers (distclean: also .venv)
#
# PYTHONPATH=$(CURDIR) is deliberate: Twisted finds twistd plugins by scanning every
# sys.path entry for a twisted/plugins/ directory (twisted.plugin.pluginPackagePaths).
# The editable install maps the packages through an import hook and puts no directory
# of the checkout on sys.path, so without it twistd would not see
# twisted/plugins/hoodyproxy_plugin.py.  A non-editable install ships that file into
# site-packages/twisted/plugins/ (see the packaging section of setup.cfg).

SHELL := /bin/bash
.DEFAULT_GOAL := test

# The interpreter .venv is made from: Debian's /usr/bin/python3 when it can make a venv
# (3.11 or later, python3-venv installed), else python3 from PATH; PYTHON=... chooses.
# Debian builds its CPython with profile-guided optimization and LTO and links it
# statically; the gateway spends about 13 % less CPU per request on it than on a CPython
# built without those (pyenv's default build, a shared libpython): docs/performance.rst,
# "The interpreter".  An existing .venv is kept (make distclean makes it anew).
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1 && echo /usr/bin/python3 || echo python3)
VENV := .venv
VENV_PY := $(VENV)/bin/python
# One stamp per kind of install: `make run` must not pull in the test extras, and `make
# test` after `make run` must still install them.
STAMP := $(VENV)/.installed-test
RUN_STAMP := $(VENV)/.installed-run
# make bench: the test extras and the bench extras.
BENCH_STAMP := $(VENV)/.installed-bench

# Debian packages the tests need (command-line tools, servers the tests start).
# Later work appends to this list (nginx, slapd, pebble, ...; wrk for load across a drain,
# an upgrade or a killed worker; systemd for systemd-analyze verify of contrib/systemd;
# etcd-server for the shared store's three-member test cluster).
DEBIAN_TEST_PACKAGES := curl openssl procps slapd iptables conntrack iproute2 pebble nghttp2-client chromium wrk systemd docker.io busybox-static etcd-server

# Debian packages the benchmark harness needs (make bench; see docs/performance.rst);
# valgrind for bench/inproc_instructions.py.
# mitmproxy is not among them: the harness installs it into bench/.venv-mitm itself.
DEBIAN_BENCH_PACKAGES := nginx haproxy caddy wrk nghttp2-client valgrind

TESTS ?= tests
TRIAL_ARGS ?=
# tests/durations.py (a Trial reporter plugin in twisted/plugins/): Trial's usual tree
# output, then the ten slowest tests with their times.
TRIAL_REPORTER ?= durations
# The reactor a node runs (hoodyproxy/reactor.py, named in twisted/plugins/
# hoodyproxy_reactor.py): its batched writes are under every test, not only the tests
# that start twistd.  TRIAL_REACTOR=epoll runs the suite on Twisted's own.
TRIAL_REACTOR ?= hoodyproxy
ARGS ?=

RUN_ENV := PYTHONPATH=$(CURDIR)

.PHONY: venv run-venv deps test run demo bench clean distclean

venv: $(STAMP)

run-venv: $(RUN_STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV_PY) setup.cfg pyproject.toml
	$(VENV_PY) -m pip install -e '.[test]'
	touch $@

$(RUN_STAMP): $(VENV_PY) setup.cfg pyproject.toml
	$(VENV_PY) -m pip install -e .
	touch $@

$(BENCH_STAMP): $(VENV_PY) setup.cfg pyproject.toml
	$(VENV_PY) -m pip install -e '.[test,bench]'
	touch $@

deps:
	@missing=""; \
	for p in $(DEBIAN_TEST_PACKAGES); do \
	    dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	    echo "deps: not root, not installing missing Debian packages:$$missing"; \
	    exit 0; \
	fi; \
	echo "deps: installing Debian packages:$$missing"; \
	apt-get update && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

test: venv deps
	$(RUN_ENV) $(VENV)/bin/trial -j2 --reactor=$(TRIAL_REACTOR) --temp-directory=_trial_temp --reporter=$(TRIAL_REPORTER) $(TRIAL_ARGS) $(TESTS)

# As root the node installs netfilter rules and routes (transparent mode); it logs them,
# and a clean stop (Ctrl-C, SIGTERM) removes them.
run: run-venv
	$(RUN_ENV) $(VENV)/bin/twistd -n hoodyproxy $(ARGS)

demo: run-venv
	$(RUN_ENV) $(VENV)/bin/twistd -n hoodyproxy --demo $(ARGS)

# The harness also uses curl and openssl (DEBIAN_TEST_PACKAGES, through deps).
.PHONY: bench-deps
bench-deps:
	@missing=""; \
	for p in $(DEBIAN_BENCH_PACKAGES); do \
	    dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	    echo "bench: not root, not installing missing Debian packages:$$missing"; \
	    exit 0; \
	fi; \
	echo "bench: installing Debian packages:$$missing"; \
	apt-get update && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

bench: $(BENCH_STAMP) deps bench-deps
	$(RUN_ENV) $(VENV_PY) -m bench $(ARGS)

clean:
	rm -rf _trial_temp _trial_temp.lock build dist *.egg-info twistd.pid twisted/plugins/dropin.cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
