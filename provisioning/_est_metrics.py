"""est-server metrics: counted in each worker, summed and served by the supervisor.

How the workers' counts meet: each worker counts in memory (one event loop, no
locks) and writes a snapshot, ``<directory>/worker-<index>.json``, once a second
and when it stops (an atomic rename; no fsync: these are not records). The
supervisor serves ``GET /metrics`` on ``[metrics] host:port`` from a thread of its
own: it sums the snapshots and adds what only it knows, the published CRL's age,
read from the file at each scrape. A worker that is restarted starts from its
predecessor's snapshot, so no total the supervisor serves goes backwards while
the server runs; a worker killed outright loses at most a second of counts.
A file per worker rather than a pipe to the parent keeps the supervisor's loop as
it is, and survives the worker that wrote it.

Why not ``prometheus_client``: its multiprocess mode does the same with mmap'd
files per PID, an environment variable that must be set before the import, and a
collector in the parent; the text format is small (device_agent/_prometheus.py), the
aggregation here is a sum, and the server then needs no dependency beyond aiohttp.

Counters (``_total``) and the latency histogram are per worker, summed; labels are
from small fixed sets (endpoints, status classes, issuance kinds, refusal kinds),
never a device ID or a peer address.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from device_agent._prometheus import exposition, histogram, sample

from .errors import ProvisioningError
from .registry import IssuanceKind

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]
# A snapshot as JSON: {"counters": [[name, {label: value}, number]],
#                      "histograms": [[name, {label: value}, [bucket counts..., +Inf, sum]]]}
Snapshot = dict[str, list[Any]]
_HELP = {
    "est_requests_total": ("counter", "HTTP requests answered, by endpoint and status class"),
    "est_request_duration_seconds": ("histogram", "Time from request head to answer"),
    "est_issuances_total": ("counter", "Operational certificates issued, by issuance kind"),
    "est_decisions_total": ("counter", "Policy decisions (each an audit row), by operation "
                                       "and outcome"),
    "est_refusals_total": ("counter", "Refusals by reason: the edge's refusal-log kinds, "
                                      "and policy-<status> for the policy's"),
    "est_crl_readable": ("gauge", "1 when the published CRL could be read"),
    "est_crl_age_seconds": ("gauge", "Seconds since the published CRL's thisUpdate"),
    "est_crl_next_update_seconds": ("gauge", "Seconds until the published CRL's nextUpdate "
                                             "(negative: expired)"),
    "est_workers_reporting": ("gauge", "Worker snapshots summed in this scrape"),
}


def endpoint_of(path: str) -> str:
    """The label for a request path: the EST operation, or ``other`` (no free text)."""
    operation = path.removeprefix("/.well-known/est/")
    known = ("cacerts", "csrattrs", "simpleenroll", "simplereenroll",
             "recovery/simplereenroll")
    return operation if operation in known else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class WorkerMetrics:
    """One worker's counts; :meth:`save` writes them where the supervisor reads them."""

    def __init__(self, path: Path, refusals: Counter[str] | None = None) -> None:
        self.path = path
        self.counters: dict[Key, float] = {}
        self.histograms: dict[Key, list[float]] = {}
        self.refusals: Counter[str] = refusals if refusals is not None else Counter()
        self._base = _read_snapshot(path)  # a predecessor's totals, when restarted

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0.0) + amount

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        cell = self.histograms.setdefault((name, tuple(sorted(labels.items()))),
                                          [0.0] * (len(BUCKETS) + 2))
        index = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
        cell[index] += 1  # non-cumulative here; cumulative when rendered
        cell[-1] += seconds

    def request(self, endpoint: str, status: str, seconds: float) -> None:
        self.count("est_requests_total", endpoint=endpoint, code=status)
        self.observe("est_request_duration_seconds", seconds, endpoint=endpoint)

    def snapshot(self) -> Snapshot:
        counters = dict(self.counters)
        for kind, value in self.refusals.items():
            counters[("est_refusals_total", (("reason", kind),))] = float(value)
        return to_json(merge([self._base, to_json((counters, self.histograms))]))

    def save(self) -> None:
        """Replace the snapshot file; an error is the caller's to log, not to die of."""
        data = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise


def middleware(metrics: WorkerMetrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware counting every answered request and its latency."""

    @web.middleware
    async def measure(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        started = time.monotonic()
        code = "5xx"  # an exception aiohttp answers with 500
        try:
            response = await handler(request)
            code = status_class(response.status)
            return response
        except web.HTTPException as exc:
            code = status_class(exc.status)
            raise
        except asyncio.CancelledError:
            code = "aborted"  # the client went away first
            raise
        finally:
            metrics.request(endpoint_of(request.path), code, time.monotonic() - started)

    return measure


def _read_snapshot(path: Path) -> Snapshot:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else {"counters": [], "histograms": []}


Merged = tuple[dict[Key, float], dict[Key, list[float]]]


def to_json(merged: Merged) -> Snapshot:
    counters, histograms = merged
    return {"counters": [[name, dict(labels), value]
                         for (name, labels), value in counters.items()],
            "histograms": [[name, dict(labels), cell]
                           for (name, labels), cell in histograms.items()]}


def merge(snapshots: Iterable[Snapshot]) -> Merged:
    """The sum of worker snapshots: counters by name and labels, histograms by bucket.
    A malformed row (a snapshot half from another release) is skipped."""
    counters: dict[Key, float] = {}
    histograms: dict[Key, list[float]] = {}
    for snapshot in snapshots:
        for row in snapshot.get("counters", []):
            try:
                name, labels, value = str(row[0]), _key(row[1]), float(row[2])
            except (TypeError, ValueError, IndexError, AttributeError):
                continue
            counters[(name, labels)] = counters.get((name, labels), 0.0) + value
        for row in snapshot.get("histograms", []):
            try:
                name, labels, cell = str(row[0]), _key(row[1]), [float(v) for v in row[2]]
            except (TypeError, ValueError, IndexError, AttributeError):
                continue
            if len(cell) != len(BUCKETS) + 2:
                continue
            total = histograms.setdefault((name, labels), [0.0] * len(cell))
            for i, value in enumerate(cell):
                total[i] += value
    return counters, histograms


def _key(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def render(merged: Merged, gauges: Mapping[str, float]) -> str:
    """One scrape's text: the workers' ``merged`` counts and the supervisor's ``gauges``."""
    counters, histograms = merged
    families: dict[str, list[str]] = {}
    for (name, labels), value in sorted(counters.items()):
        families.setdefault(name, []).append(sample(name, value, labels))
    for (name, labels), cell in sorted(histograms.items()):
        families.setdefault(name, []).extend(histogram(name, labels, BUCKETS, cell[:-1],
                                                       cell[-1]))
    for name, value in gauges.items():
        families.setdefault(name, []).append(sample(name, value))
    return exposition(families, _HELP)


# --- the supervisor's side ---------------------------------------------------------------


class CRLWatch:
    """The published CRL's dates, read again only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._dates: tuple[float, float | None] | None = None

    def gauges(self, now: float) -> dict[str, float]:
        try:
            stat = self.path.stat()
            if self._seen != (stat.st_mtime_ns, stat.st_size):
                crl = x509.load_pem_x509_crl(self.path.read_bytes())
                following = crl.next_update_utc
                self._dates = (crl.last_update_utc.timestamp(),
                               following.timestamp() if following else None)
                self._seen = (stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            self._seen = self._dates = None
        if self._dates is None:
            return {"est_crl_readable": 0.0}
        this_update, next_update = self._dates
        gauges = {"est_crl_readable": 1.0, "est_crl_age_seconds": round(now - this_update, 3)}
        if next_update is not None:
            gauges["est_crl_next_update_seconds"] = round(next_update - now, 3)
        return gauges


def scrape(directory: Path, crl: CRLWatch, now: float | None = None) -> str:
    snapshots = [_read_snapshot(path) for path in sorted(directory.glob("worker-*.json"))]
    gauges = crl.gauges(time.time() if now is None else now)
    gauges["est_workers_reporting"] = float(len(snapshots))
    counters, histograms = merge(snapshots)
    for kind in IssuanceKind:  # a series from the start, so rate() sees the first one
        counters.setdefault(("est_issuances_total", (("kind", kind.value),)), 0.0)
    return render((counters, histograms), gauges)


class MetricsServer:
    """``GET /metrics`` over plain HTTP on the supervisor's thread (loopback by default)."""

    def __init__(self, host: str, port: int, directory: Path, crl_path: Path) -> None:
        crl = CRLWatch(crl_path)
        lock = threading.Lock()  # one scrape at a time: CRLWatch caches

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                with lock:
                    body = scrape(directory, crl).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ProvisioningError(f"metrics: cannot listen on {host}:{port}: "
                                    f"{exc.strerror}") from exc
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
