.PHONY: setup demo test bench lint

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
