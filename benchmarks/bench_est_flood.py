"""EST enrollment latency with and without a flood of strangers, measured in one run.

    .venv/bin/python benchmarks/bench_est_flood.py [--devices 50] [--flood 1000]

The same est-server (2 workers) serves two phases of ``--devices`` first enrollments,
four at a time, each over a new mTLS connection: alone, then while other processes
send at least ``--flood`` requests without a client certificate (401 expected, with a
challenge) and as many with a certificate from an unknown CA of the same name (refused
by TLS), and go on until the devices are done. Clients and server share this machine's
cores, so the flood costs the devices client CPU as well as server CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing
import multiprocessing.synchronize
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _est_process import running_est  # noqa: E402
from bench_est import free_port, prepare  # noqa: E402

from device_agent._files import write_private  # noqa: E402
from provisioning import pki  # noqa: E402
from provisioning.registry import open_registry  # noqa: E402

FLOOD_PROCESSES = 2
FLOOD_THREADS = 8  # per process, half of them anonymous
CONCURRENT_DEVICES = 4
REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)


def exchange(context: ssl.SSLContext, port: int, body: bytes) -> bytes:
    """One POST to simpleenroll on a new connection; the response head ("" if closed)."""
    request = (b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/pkcs10\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(request)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    return reply.partition(b"\r\n\r\n")[0]


def outcome(context: ssl.SSLContext, port: int, body: bytes) -> str:
    try:
        head = exchange(context, port, body)
    except REFUSED:
        return "refused by TLS"
    if not head:
        return "refused by TLS"  # closed before an answer: TLS 1.3 reports it late
    status_line, *lines = head.decode("latin-1").split("\r\n")
    challenges = [value.split()[0] for name, _, value in (line.partition(":") for line in lines)
                  if name.strip().lower() == "www-authenticate" and value.split()]
    return f"{status_line.split()[1]} challenge {','.join(challenges) or 'none'}"


def _flood_process(paths: pki.PKIPaths, port: int, forged: tuple[Path, Path], body: bytes,
                   share: int, started: multiprocessing.synchronize.Event,
                   stop: multiprocessing.synchronize.Event,
                   results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    anonymous = ssl.create_default_context(cafile=paths.server_trust)
    unknown = ssl.create_default_context(cafile=paths.server_trust)
    unknown.load_cert_chain(*forged)
    counts: list[Counter[tuple[str, str]]] = [Counter() for _ in range(FLOOD_THREADS)]

    def loop(i: int) -> None:
        kind, context = ("anonymous", anonymous) if i % 2 else ("unknown-ca", unknown)
        while counts[i].total() < share or not stop.is_set():
            try:
                counts[i][kind, outcome(context, port, body)] += 1
            except OSError as exc:
                counts[i][kind, type(exc).__name__] += 1
            started.set()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(FLOOD_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(sum(counts, Counter()))


def enrollments(paths: pki.PKIPaths, port: int,
                identities: list[tuple[Path, Path, bytes]]) -> list[tuple[bool, float]]:
    """Each identity enrolls once, CONCURRENT_DEVICES at a time: (200?, seconds)."""
    def one(identity: tuple[Path, Path, bytes]) -> tuple[bool, float]:
        cert, key, body = identity
        context = ssl.create_default_context(cafile=paths.server_trust)
        context.load_cert_chain(cert, key)
        started = time.monotonic()
        try:
            ok = exchange(context, port, body).startswith(b"HTTP/1.1 200")
        except (OSError, ssl.SSLError):
            ok = False
        return ok, time.monotonic() - started

    with ThreadPoolExecutor(CONCURRENT_DEVICES) as pool:
        return list(pool.map(one, identities))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def forged_identity(directory: Path) -> tuple[Path, Path]:
    """A client certificate from a CA named like the Factory CA, with another key."""
    fake = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = fake.issue_client("forged", key.public_key(), dt.timedelta(days=1))
    return (write_private(directory / "forged.pem", pki.cert_pem(cert), 0o644),
            write_private(directory / "forged.key", pki.key_pem(key)))


def certificates(paths: pki.PKIPaths) -> int:
    with open_registry(paths.registry) as registry:
        return registry.count_certificates()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50, help="enrollments per phase")
    parser.add_argument("--flood", type=int, default=1000,
                        help="at least this many requests of each kind of stranger")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-est-flood-") as tmp:
        directory = Path(tmp)
        paths, identities = prepare(directory, 2 * args.devices)
        forged = forged_identity(directory)
        port = free_port()
        with running_est(directory, paths, port, "full"):
            before = certificates(paths)
            alone = enrollments(paths, port, identities[:args.devices])
            between = certificates(paths)

            share = math.ceil(args.flood / (FLOOD_PROCESSES * FLOOD_THREADS // 2))
            started, stop = multiprocessing.Event(), multiprocessing.Event()
            results: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
            flood = [multiprocessing.Process(target=_flood_process,
                                             args=(paths, port, forged, identities[0][2], share,
                                                   started, stop, results))
                     for _ in range(FLOOD_PROCESSES)]
            flood_start = time.monotonic()
            for proc in flood:
                proc.start()
            started.wait(60)
            try:
                during = enrollments(paths, port, identities[args.devices:])
            finally:
                stop.set()
            strangers: Counter[tuple[str, str]] = sum(
                (results.get(timeout=600) for _ in flood), Counter())
            flood_seconds = time.monotonic() - flood_start
            for proc in flood:
                proc.join(30)
            after = certificates(paths)

    figures = {}
    print(f"machine: {os.cpu_count()} CPUs; EST workers: 2; {args.devices} first enrollments "
          f"per phase, {CONCURRENT_DEVICES} at a time, a new mTLS connection each")
    print(f"{'phase':<14} {'p50 ms':>8} {'p99 ms':>8} {'200s':>6} {'certificates':>13}")
    for name, runs, grown in (("without flood", alone, between - before),
                              ("with flood", during, after - between)):
        times = [seconds for _, seconds in runs]
        figures[name] = (percentile(times, 50), percentile(times, 99))
        p50, p99 = figures[name]
        print(f"{name:<14} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f} "
              f"{sum(ok for ok, _ in runs):>6} {grown:>+13}")
    (p50_alone, p99_alone), (p50_flood, p99_flood) = figures.values()
    print(f"{'ratio':<14} {p50_flood / p50_alone:>8.2f} {p99_flood / p99_alone:>8.2f}")
    print(f"flood: {strangers.total()} requests in {flood_seconds:.1f} s from "
          f"{FLOOD_PROCESSES} processes x {FLOOD_THREADS} connections")
    for (kind, what), count in sorted(strangers.items()):
        print(f"  {kind:<11} {what:<36} {count:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
