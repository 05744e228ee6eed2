.PHONY: setup demo test bench lint deb test-fresh test-systemd

# The TSS logs expected misses (an absent SRK on first boot) as errors; keep output readable.
export TSS2_LOG ?= all+none

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/fleet-sim --devices 5 --scenario full --json demo-out/report.json --plot demo-out/fleet.png

test: setup
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python benchmarks/bench_tls.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy device_agent provisioning broker_config simulator

# Debian packages of the agent and the back office, for the release this machine runs.
deb: setup
	/usr/bin/python3 packaging/build_deb.py

# The README's two commands on a fresh Debian root: make test-fresh DIST=bookworm|trixie
DIST ?= bookworm
test-fresh: setup
	bash scripts/fresh-root.sh $(DIST)

# The .deb and the unit under a real systemd (PID 1 in a container on a fresh DIST root);
# the package for DIST comes from make deb on DIST, or from make test-fresh DIST=...
test-systemd: setup
	DIST=$(DIST) .venv/bin/python -m pytest -p no:cacheprovider -s systemtests
