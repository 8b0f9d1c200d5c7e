# deltafleet developer entry points. Needs only Python 3.11+ on PATH; everything else is installed here.
PYTHON ?= python3
SYSTEM_UV := $(shell command -v uv 2>/dev/null)
UV := $(if $(SYSTEM_UV),$(SYSTEM_UV),$(CURDIR)/.tools/bin/uv)
export FLEET_UV := $(UV)
RUN := $(UV) run --frozen --no-sync

.PHONY: install system-packages demo monitor test test-fast lint bench clean

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv

.venv/.installed: $(UV) pyproject.toml uv.lock shared/pyproject.toml agent/pyproject.toml server/pyproject.toml
	$(UV) sync --frozen --all-packages --all-extras --compile-bytecode
	@# byte-compile our own sources too: imports stay fast even with PYTHONDONTWRITEBYTECODE set
	.venv/bin/python -m compileall -q shared/src agent/src server/src migrations scripts tests/harness
	@touch $@

install: .venv/.installed system-packages

# Debian packages the tests need, installed only when missing, with ONE apt-get update:
# prometheus + promtool (metrics tests, `make monitor`) and chromium (console tests, driven by
# Playwright: no browser download). policy-rc.d (exit 101) keeps the prometheus package from
# starting its own service on :9090; tests and `make monitor` run their own on a free port.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
CHROMIUM := /usr/bin/chromium
system-packages:
	@prom=; chrome=; \
	command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || prom=prometheus; \
	[ -x $(CHROMIUM) ] || chrome=chromium; \
	if [ -n "$$prom$$chrome" ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "note: install $$prom $$chrome (Debian packages) for the metrics and console tests"; \
	    exit 0; \
	  fi; \
	  echo "installing $$prom $$chrome (Debian packages)"; \
	  made_policy=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null && \
	    $(SUDO) chmod 755 /usr/sbin/policy-rc.d && made_policy=1; \
	  fi; \
	  $(SUDO) apt-get update -qq && \
	  { [ -z "$$prom" ] || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null; } && \
	  { [ -z "$$chrome" ] || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      chromium >/dev/null; }; rc=$$?; \
	  [ -n "$$made_policy" ] && $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	  exit $$rc; \
	fi

demo: install
	$(RUN) python -m scripts.demo

monitor: install
	$(RUN) python -m scripts.monitor

test: install
	$(RUN) pytest

test-fast: install
	$(RUN) pytest tests/unit

lint: install
	$(RUN) ruff check shared agent server scripts tests migrations
	$(RUN) mypy shared/src agent/src server/src

bench: install
	$(RUN) python -m scripts.bench.run_all

clean:
	rm -rf .venv .tools .pytest_cache .demo
