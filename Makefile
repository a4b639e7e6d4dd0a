# One command per chore; the same locally and in CI.
#   make test    set up (venv, package, mosquitto) and run the suite
#   make demo    set up and run the end-to-end demo
#   make lint    ruff, mypy and the import contracts (lint-imports)
#   make bench   the benchmarks (about 13 minutes); JSON and a plot under bench/results/
#   make soak    1000 jobs with the cable pulled every 3 s, then 300 with the worker killed at random
#   make scale   1,000 simulated cars against 3 fleet replicas on PostgreSQL; bench/results/scale.json
#   make mutants mutation testing of agent/core (mutmut) with the fast tests
#   make models  regenerate the shipped models (needs the models extra)
#   make deb     the .deb packages (Debian 12 and 13, amd64 and arm64) into dist/deb/
#   make rig-test  the packages installed in booted Debian containers, README step by step (root)
#   make interop   the demo and an agent-and-fleet run against ejabberd's MQTT broker (root)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench soak mutants models mosquitto postgresql clean deb rig-test rig-tools scale interop ejabberd

setup: mosquitto $(STAMP)

# The mosquitto binary: installed with apt-get when running as root, else a clear instruction.
mosquitto:
	@if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing: run 'sudo apt-get install -y mosquitto', then 'make $(MAKECMDGOALS)' again"; \
		exit 1; \
	fi

# PostgreSQL's server binaries (initdb, pg_ctl; the tests start a private cluster, no service).
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing postgresql with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else \
		echo "postgresql is missing: run 'sudo apt-get install -y postgresql', then 'make $(MAKECMDGOALS)' again"; \
		exit 1; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is needed (found $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
			&& $(PYTHON) -m venv $(VENV); \
		else echo "python venv is missing: run 'sudo apt-get install -y python3-venv'"; exit 1; fi; }
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# The suite starts private PostgreSQL clusters (the job store's contract and replica tests).
test: setup postgresql
	$(BIN)/pytest -q

demo: setup
	$(BIN)/edge-fleet demo

lint: setup
	$(BIN)/ruff check agent broker tests bench models
	$(BIN)/ruff format --check agent broker tests bench models
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m bench.run

# 1,000 simulated cars, 3 fleet replicas, PostgreSQL and Mosquitto (about 25 minutes).
scale: setup postgresql
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m bench.scale

soak: setup
	$(BIN)/python -m bench.soak --mode cable
	$(BIN)/python -m bench.soak --mode kill-worker

# Mutation testing of the pure core with its fast tests (about 2 minutes); the score is in
# docs/architecture.md. `mutmut results` lists the survivors afterwards.
mutants: setup
	$(BIN)/pip install -q --disable-pip-version-check -e '.[mutation]'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	@$(BIN)/mutmut results | grep -v ': killed' || true

models: setup
	$(BIN)/pip install -q -e '.[models]'
	$(BIN)/python models/build_models.py

DEB_TARGETS ?= bookworm:amd64 trixie:amd64 bookworm:arm64 trixie:arm64
deb: setup
	@command -v dpkg-deb >/dev/null || { echo "dpkg-deb is missing (apt-get install dpkg)"; exit 1; }
	@for t in $(DEB_TARGETS); do bash systemd/debian/build-deb $${t%%:*} $${t##*:} || exit 1; done

# What the rig test needs on the host: debootstrap, systemd-nspawn, qemu-user for arm64.
rig-tools:
	@if command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null \
		&& [ -e /usr/bin/qemu-aarch64-static ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing debootstrap, systemd-container, qemu-user-static with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			debootstrap systemd-container qemu-user-static binfmt-support >/dev/null; \
	else echo "run as root: the rig test boots containers"; exit 1; fi

rig-test: setup rig-tools
	$(MAKE) deb DEB_TARGETS="bookworm:amd64 trixie:amd64 bookworm:arm64"
	$(BIN)/python -m tests.rig.run

# A second MQTT implementation: ejabberd's mod_mqtt (Debian 12 has 23.01). The tests start a
# private server on a free loopback port; nothing of a system ejabberd is touched.
ejabberd:
	@if command -v ejabberdctl >/dev/null || [ -x /usr/sbin/ejabberdctl ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing ejabberd with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ejabberd >/dev/null; \
	else echo "run as root: make interop installs ejabberd and runs it as its own user"; exit 1; fi

interop: setup ejabberd
	$(BIN)/pytest -q -m interop tests/interop

clean:
	rm -rf $(VENV) mutants demo-run demo-report.json dist .pytest_cache .mypy_cache .ruff_cache
