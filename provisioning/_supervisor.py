"""The est-server parent: check the set-up, start the workers, keep them, stop them in order.

Everything a worker would fail on (CA passphrase, registry schema, TLS files)
is checked here first, so a bad set-up is one clear error instead of N dying
workers. A worker that dies is restarted, within a budget; SIGTERM or SIGINT
is forwarded as SIGTERM so every worker finishes its requests, then stragglers
are killed and everything is reaped.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import pki
from ._est_metrics import MetricsServer
from .errors import ProvisioningError
from .est_config import ServerConfig
from .est_server import log_event, recovery_context, server_context
from .registry import open_registry

READY_TIMEOUT = 30.0
RESTARTS = 5
RESTART_WINDOW = 60.0


class _Workers:
    def __init__(self, config: ServerConfig, config_path: Path,
                 metrics_dir: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path.absolute()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.options = ["--metrics-dir", str(metrics_dir)] if metrics_dir else []

    def start(self, index: int) -> None:
        """Start worker ``index`` and wait until it listens (or fail with its exit code)."""
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "provisioning.est_server", "--config",
                 str(self.config_path), "--worker", str(index), "--ready-fd", str(write_fd),
                 *self.options],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL)
            os.close(write_fd)
            self.procs[index] = proc
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                readable, _, _ = select.select([read_fd], [], [], 0.1)
                if readable and os.read(read_fd, 1) == b"r":
                    return
                if proc.poll() is not None:
                    raise ProvisioningError(f"worker {index} exited with {proc.returncode} "
                                            "before listening")
            raise ProvisioningError(f"worker {index} not listening after {READY_TIMEOUT:.0f}s")
        finally:
            os.close(read_fd)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def preflight(config: ServerConfig) -> None:
    # Opened to check it (a wrong passphrase, PIN or token fails here, once), then given
    # back: each worker opens the key in its own process.
    with pki.open_authority(config.pki.device_ca, config.passphrase()):
        pass
    server_context(config.pki)
    if config.recovery_port is not None:
        recovery_context(config.pki)
    with open_registry(config.registry):
        pass


def supervise(config: ServerConfig, config_path: Path) -> int:
    preflight(config)
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics: MetricsServer | None = None
    metrics_dir: Path | None = None
    if config.metrics_port is not None:
        # the workers' snapshots, summed at each scrape (_est_metrics.py); this run's only
        metrics_dir = Path(tempfile.mkdtemp(prefix="est-server-metrics-"))
        try:
            metrics = MetricsServer(config.metrics_host, config.metrics_port, metrics_dir,
                                    config.crl or config.pki.crl).start()
        except ProvisioningError:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            raise
    workers = _Workers(config, config_path, metrics_dir)
    restarts: list[float] = []
    status = 0
    try:
        for index in range(config.workers):
            workers.start(index)
        log_event("ready", host=config.host, port=config.port,
                  recovery_port=config.recovery_port, metrics_port=config.metrics_port,
                  workers=config.workers,
                  pids=[p.pid for p in workers.procs.values()])
        while not stop:
            time.sleep(0.2)
            for index, proc in list(workers.procs.items()):
                if proc.poll() is None or stop:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                log_event("worker_exited", logging.WARNING, worker=index, code=proc.returncode)
                if len(restarts) > RESTARTS:
                    raise ProvisioningError(f"workers died {len(restarts)} times within "
                                            f"{RESTART_WINDOW:.0f}s; giving up")
                workers.start(index)
    except ProvisioningError as exc:
        log_event("error", logging.ERROR, error=str(exc))
        status = 1
    finally:
        workers.stop()
        if metrics is not None:
            metrics.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log_event("stopped", signal=stop[0] if stop else None)
    return status
