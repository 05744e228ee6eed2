"""The real est-server as a benchmark's subprocess: started, waited for, stopped.

bench_est.py, bench_est_flood.py and bench_hsm.py each measure against it, so the start
(config, readiness wait) and the stop (SIGTERM, then SIGKILL to the whole process group
if the supervisor has not exited in 20 s) are written once here, as a context manager.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from provisioning import pki

WORKERS = 2


def _start(directory: Path, paths: pki.PKIPaths, port: int,
           sync: str) -> subprocess.Popen[bytes]:
    config = directory / f"est-{sync}.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = {WORKERS}\nmax_in_flight = 256\n'
                      f'[pki]\ndirectory = "{paths.base}"\nregistry_sync = "{sync}"\n'
                      '[policy]\ncertificate_lifetime = "1d"\n'
                      # the same devices enroll again and again: lift the daily budget
                      'bootstrap_reenrolls_per_day = 1000000000\n')
    log = directory / f"est-{sync}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "est-server"), "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while b'"event":"ready"' not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"est-server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


@contextmanager
def running_est(directory: Path, paths: pki.PKIPaths, port: int,
                sync: str) -> Iterator[None]:
    """An est-server on ``port`` serving ``paths`` (registry_sync ``sync``) for the
    ``with`` block; its config and log go in ``directory``."""
    server = _start(directory, paths, port, sync)
    try:
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
