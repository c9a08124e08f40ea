# pausepatch — `make demo` and `make test` set everything up themselves (idempotently).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages: the NATS server, what libvirt-python compiles against, the compose validator,
# systemd-analyze for unit checks, iproute2 for network namespaces, util-linux (chrt, setpriv,
# prlimit) for the real-time window checks.
SYSTEM_PACKAGES := nats-server libvirt-dev libvirt0 pkg-config gcc python3-dev python3-venv \
	docker-compose iproute2 systemd util-linux

.PHONY: setup system venv demo test test-fast lint bench qemu-up qemu-down clean

setup: system venv

system:
	@bash deploy/setup/system-packages.sh $(SYSTEM_PACKAGES)

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	@$(VENV)/bin/pausepatch demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared services bench tests

# Real QEMU under libvirtd (TCG, as root, no systemd) for the tests marked `qemu`.
qemu-up: setup
	@bash deploy/libvirt/libvirtd-up.sh
	@bash deploy/libvirt/build-guest.sh

qemu-down:
	@bash deploy/libvirt/libvirtd-down.sh

test: lint qemu-up
	$(PY) -m pytest -q -ra

test-fast: lint
	$(PY) -m pytest -q -ra -m "not qemu"

# Figures as tables and JSON under bench/results/ (each a ratio against a baseline of the same run).
bench: setup qemu-up
	$(PY) bench/bench_planning.py
	$(PY) bench/bench_planner_scale.py
	$(PY) bench/bench_inventory.py
	$(PY) bench/bench_publish.py
	$(PY) bench/bench_fetch.py
	$(PY) bench/bench_pause.py --qemu
	$(PY) bench/bench_notifier.py
	$(PY) bench/bench_soak.py

clean:
	rm -rf $(VENV) build .state .pytest_cache .mypy_cache .ruff_cache
