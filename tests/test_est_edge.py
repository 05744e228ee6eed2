"""The est-server's edge, as a stranger meets it: challenges, floods, idle and slow
connections, connection limits, failed handshakes, and the TLS 1.2 suites on offer.

What a client that never authenticates can do must cost the registry nothing (no
lock, no audit row, not a byte of file) and cost the log one line per kind per
interval, with a count; what it can hold (sockets, handshakes, half-sent requests)
is bounded in time and in number, and never keeps a device out: a full worker gives
the place of the connection quiet longest to the newcomer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import resource
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from device_agent.errors import ConfigError
from provisioning import est_config, pki
from provisioning._est_guard import (
    DESCRIPTOR_MARGIN,
    ConnectionLimits,
    GuardedListener,
    RefusalLog,
    _Slot,
    descriptor_plan,
)
from simulator.processes import require

from .est_support import (
    TLS_REFUSED,
    WELL_KNOWN,
    ESTServer,
    Identity,
    bootstrap_identity,
    client_context,
    csr_der,
    enroll,
    new_key,
    post,
    recover,
    running_est_server,
    save_identity,
)

pytestmark = pytest.mark.integration
FAST = {"handshake_timeout": 2, "idle_timeout": 2, "body_timeout": 2, "refusal_log_interval": 2}


def events(server: ESTServer, name: str) -> list[dict[str, object]]:
    lines = server.log.read_text().splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{"))
            if e["event"] == name]


def refused(server: ESTServer, kind: str) -> list[dict[str, object]]:
    return [e for e in events(server, "refused") if e["kind"] == kind]


def stopped_totals(server: ESTServer) -> Counter[str]:
    """Each worker's refusal counters as its "stopped" line gives them, summed."""
    totals: Counter[str] = Counter()
    for event in events(server, "stopped"):
        totals.update(event.get("refusals") or {})  # type: ignore[arg-type]
    return totals


def registered(server: ESTServer, directory: Path, factory: pki.Authority,
               device_id: str) -> Identity:
    boot = bootstrap_identity(directory, factory, device_id)
    with server.registry() as registry:
        registry.register_device(device_id, boot.certificate)
    return boot


def registry_state(server: ESTServer) -> tuple[dict[str, int], int, int]:
    """File sizes (database, WAL), audit rows, certificates."""
    sizes = {suffix: os.path.getsize(f"{server.registry_path}{suffix}")
             for suffix in ("", "-wal") if os.path.exists(f"{server.registry_path}{suffix}")}
    with server.registry() as registry:
        return sizes, len(registry.audit_log(limit=1_000_000)), registry.count_certificates()


def connect(server: ESTServer, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection that sends nothing, from ``source`` (any 127/8 address is ours)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def dropped(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def wait_closed(sock: socket.socket, limit: float) -> None:
    """Until the server closes ``sock`` (which sends nothing more); fails past ``limit``.
    An answer before the close is read and discarded."""
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        pytest.fail(f"still open after {limit}s")


def descriptors_for(count: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to hold ``count`` more sockets, if the hard
    limit allows (it is inherited by the servers the test starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256 + len(os.listdir("/proc/self/fd"))
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def test_the_refusal_log_writes_one_line_per_kind_per_interval() -> None:
    """A refusal a second for 25 s, a 10 s interval: lines at 0, 10 and 20 s, the rest
    when a flush finds it due; every refusal counted once."""
    now = [0.0]
    lines: list[tuple[str, int, int]] = []
    log = RefusalLog(lambda event, kind, count, total, **_: lines.append((kind, count, total)),
                     10.0, clock=lambda: now[0])
    for second in range(25):
        now[0] = float(second)
        log.note("no-certificate", peer="192.0.2.1")
    log.note("tls-failed", peer="192.0.2.2")
    log.flush()
    assert lines == [("no-certificate", 1, 1), ("no-certificate", 10, 11),
                     ("no-certificate", 10, 21), ("tls-failed", 1, 1)]
    now[0] = 30.0
    log.flush()
    log.flush(force=True)
    assert lines[4:] == [("no-certificate", 4, 25)]
    assert log.totals == {"no-certificate": 25, "tls-failed": 1}


def test_the_edge_keys_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "est.toml"
    path.write_text('[server]\nhandshake_timeout = 3\nmax_connections_per_peer = 8\n'
                    '[pki]\ndirectory = "pki"\n')
    config = est_config.load(path)
    assert (config.handshake_timeout, config.max_connections_per_peer, config.idle_timeout) == \
        (3.0, 8, 15.0)
    path.write_text('[server]\nmax_connections = 10\nmax_connections_per_peer = 11\n'
                    '[pki]\ndirectory = "pki"\n')
    with pytest.raises(ConfigError):
        est_config.load(path)


def test_every_401_carries_a_challenge(est_pki: pki.PKIPaths, factory_ca: pki.Authority,
                                       tmp_path: Path) -> None:
    """No certificate at all, on either endpoint; and the policy's own 401s, which a device
    can be held to: a bootstrap certificate that is not the one on record, and a still
    valid certificate on the recovery listener."""
    with running_est_server(tmp_path / "server", est_pki, recovery=True) as server:
        boot = registered(server, tmp_path / "on-record", factory_ca, "challenge-dev")
        other = bootstrap_identity(tmp_path / "another", factory_ca, "challenge-dev")
        key = new_key()
        issued = enroll(server, boot, key)
        assert issued.status == 200, issued.text
        current = save_identity(tmp_path, "operational", "challenge-dev",
                                issued.certificates()[0], key)
        csr = base64.encodebytes(csr_der(new_key(), "challenge-dev"))
        replies = [post(server, "simpleenroll", csr, None),
                   post(server, "simplereenroll", csr, None),
                   post(server, "simpleenroll", csr, other),
                   recover(server, current, new_key())]
    assert [(r.status, "WWW-Authenticate" in r.headers) for r in replies] == [(401, True)] * 4
    assert replies[0].headers["WWW-Authenticate"].startswith("TLS-Client-Certificate ")


def test_an_anonymous_flood_leaves_the_registry_as_it_was(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path) -> None:
    """500 requests without a usable certificate: not a row, not a byte; the log counts
    them in a few lines, and each worker's stop line has the totals."""
    with running_est_server(tmp_path / "server", est_pki, certificate_lifetime="1h") as server:
        boot = registered(server, tmp_path, factory_ca, "flood-dev")
        key = new_key()
        reply = enroll(server, boot, key)
        assert reply.status == 200, reply.text
        operational = save_identity(tmp_path, "operational", "flood-dev",
                                    reply.certificates()[0], key)
        csr = base64.encodebytes(csr_der(new_key(), "flood-dev"))
        requests = ([("simpleenroll", csr, None, "application/pkcs10")] * 150
                    + [("simplereenroll", b"@@ not base64", None, "application/pkcs10")] * 100
                    + [("simpleenroll", b"A" * 20000, None, "application/pkcs10")] * 50
                    + [("simpleenroll", csr, None, "text/plain")] * 100
                    + [("simpleenroll", csr, operational, "application/pkcs10")] * 100)
        before = registry_state(server)

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda r: post(server, r[0], r[1], r[2], r[3]), requests))
        elapsed = time.monotonic() - started

        assert registry_state(server) == before
        assert Counter((r.status, "WWW-Authenticate" in r.headers) for r in replies) == \
            {(401, True): 400, (403, False): 100}
        lines = refused(server, "no-certificate")
        window = time.monotonic() - started
        assert 1 <= len(lines) <= 2 * (window // 10 + 1)  # two workers, 10 s interval
        print(f"flood: 500 requests in {elapsed:.2f}s, {len(lines)} log lines")
    assert stopped_totals(server) == {"no-certificate": 400, "unusable-certificate": 100}
    counts = [e["count"] for e in refused(server, "no-certificate")]
    assert sum(c for c in counts if isinstance(c, int)) == 400


def table_rows(server: ESTServer) -> dict[str, int]:
    """Rows in each of the registry's tables."""
    with contextlib.closing(sqlite3.connect(server.registry_path)) as db:
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {table: db.execute(f'SELECT count(*) FROM "{table}"')  # noqa: S608 - ours
                .fetchone()[0] for table in tables}


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with 50 values, p99 is the slowest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def timed_enrollments(server: ESTServer, devices: list[Identity]) -> list[tuple[int, float]]:
    """Each device enrolls once, four at a time: (status, seconds) per device."""
    def one(device: Identity) -> tuple[int, float]:
        started = time.monotonic()
        status = enroll(server, device, new_key()).status
        return status, time.monotonic() - started
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, devices))


def test_a_flood_of_strangers_neither_grows_the_registry_nor_stops_enrollments(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path,
        record_property: pytest.RecordProperty) -> None:
    """50 devices enroll alone, then 50 more while at least 1,000 requests without a
    certificate and 1,000 with a certificate from an unknown CA (same name, another key)
    keep coming until they are done. Every enrollment gets its certificate; each registry
    table grows by what the second 50 explain, which is what the first 50 added; strangers
    get 401 with the challenge or are refused by TLS.

    The flood comes from threads of this process, which share its GIL with the devices:
    the latency under flood includes that (benchmarks/bench_est_flood.py floods from other
    processes)."""
    fake = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)
    key = new_key()
    forged = save_identity(tmp_path, "forged", "forged-dev",
                           fake.issue_client("forged-dev", key.public_key(),
                                             dt.timedelta(days=1)), key)
    csr = base64.encodebytes(csr_der(new_key(), "stranger"))
    with running_est_server(tmp_path / "server", est_pki, certificate_lifetime="1h") as server:
        devices = [registered(server, tmp_path / f"d{i}", factory_ca, f"flood-{i:02d}")
                   for i in range(100)]
        quiet_before = table_rows(server)
        alone = timed_enrollments(server, devices[:50])
        flood_before = table_rows(server)

        enrolled = threading.Event()

        def stranger(identity: Identity | None) -> Counter[tuple[str, object]]:
            """Requests until its share of the 2,000 is sent and the devices are done:
            what came back, by kind of stranger."""
            kind = "anonymous" if identity is None else "unknown-ca"
            outcomes: Counter[tuple[str, object]] = Counter()
            while outcomes.total() < 2_000 // 16 or not enrolled.is_set():
                try:
                    reply = post(server, "simpleenroll", csr, identity)
                except TLS_REFUSED:
                    outcomes[kind, "refused by TLS"] += 1
                    continue
                schemes = tuple(value.split()[0].lower() for name, value in reply.headers.items()
                                if name.lower() == "www-authenticate")
                outcomes[kind, (reply.status, schemes)] += 1
            return outcomes

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            flood = [pool.submit(stranger, None if i % 2 else forged) for i in range(16)]
            try:
                during = timed_enrollments(server, devices[50:])
            finally:
                enrolled.set()
            outcomes = sum((future.result() for future in flood), Counter())
        elapsed = time.monotonic() - started
        flood_after = table_rows(server)

    assert [status for status, _ in alone + during] == [200] * 100
    grown = {table: flood_after[table] - flood_before[table] for table in flood_after}
    assert grown == {table: flood_before[table] - quiet_before[table] for table in flood_after}
    assert grown["certificates"] == 50
    assert set(outcomes) == {("anonymous", (401, ("tls-client-certificate",))),
                             ("unknown-ca", "refused by TLS")}
    sent = {kind: count for (kind, _), count in outcomes.items()}
    assert min(sent.values()) >= 1_000
    figures = {name: (percentile([t for _, t in runs], 50), percentile([t for _, t in runs], 99))
               for name, runs in (("alone", alone), ("flood", during))}
    for name, (p50, p99) in figures.items():
        record_property(f"enroll_p50_ms_{name}", round(p50 * 1000, 1))
        record_property(f"enroll_p99_ms_{name}", round(p99 * 1000, 1))
    print(f"\nenrollment latency, 50 devices 4 at a time: alone p50 "
          f"{figures['alone'][0] * 1000:.0f} ms, p99 {figures['alone'][1] * 1000:.0f} ms; "
          f"beside the flood p50 {figures['flood'][0] * 1000:.0f} ms, "
          f"p99 {figures['flood'][1] * 1000:.0f} ms; flood {sent} in {elapsed:.1f}s")


def curl_i(server: ESTServer, url: str, body: Path,
           identity: Identity | None = None) -> list[tuple[int, list[tuple[str, str]]]]:
    """``curl -i`` POSTs ``body`` as a CSR: each response head it shows (status and headers,
    1xx first), as parsed from its output."""
    options = ["--cert", str(identity.cert), "--key", str(identity.key)] if identity else []
    result = subprocess.run(
        [require("curl"), "-sS", "-i", "--http1.1", "--cacert", str(server.pki.server_trust),
         "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}", *options, url],
        capture_output=True, timeout=60, check=True)
    heads = []
    rest = result.stdout
    while rest.startswith(b"HTTP/"):
        head, _, rest = rest.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        heads.append((status, [(name.strip(), value.strip())
                               for name, _, value in (line.partition(":") for line in lines)]))
        if status >= 200:
            break
    assert heads and heads[-1][0] >= 200, result.stdout[:200]
    return heads


def test_curl_i_shows_a_challenge_on_every_401(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path) -> None:
    """curl -i as an operator would run it: no client certificate on either endpoint of the
    EST listener, and a still valid certificate on the recovery listener (the policy's 401)."""
    body = tmp_path / "csr.b64"
    body.write_bytes(base64.encodebytes(csr_der(new_key(), "curl-dev")))
    with running_est_server(tmp_path / "server", est_pki, recovery=True) as server:
        boot = registered(server, tmp_path, factory_ca, "curl-dev")
        key = new_key()
        reply = enroll(server, boot, key)
        assert reply.status == 200, reply.text
        current = save_identity(tmp_path, "operational", "curl-dev", reply.certificates()[0],
                                key)
        finals = {name: curl_i(server, url, body, identity)[-1] for name, url, identity in (
            ("simpleenroll", f"{server.url}/simpleenroll", None),
            ("simplereenroll", f"{server.url}/simplereenroll", None),
            ("recovery", f"{server.recovery_url}{WELL_KNOWN}/recovery/simplereenroll", current))}
    for name, (status, headers) in finals.items():
        schemes = [value.split()[0].lower() for header, value in headers
                   if header.lower() == "www-authenticate"]
        assert (name, status, schemes) == (name, 401, ["tls-client-certificate"])


def test_idle_sockets_do_not_hold_up_an_enrollment(
        est_server: ESTServer, factory_ca: pki.Authority, tmp_path: Path,
        record_property: pytest.RecordProperty) -> None:
    """300 connections that never send a byte, 30 that finished TLS and say nothing,
    30 halfway through a request head: a device enrolls all the same."""
    boot = registered(est_server, tmp_path, factory_ca, "idle-dev")
    context = client_context(est_server, None)
    with sockets() as opened:
        opened += [connect(est_server, f"127.0.1.{i % 50 + 1}") for i in range(300)]
        opened += [context.wrap_socket(connect(est_server), server_hostname="127.0.0.1")
                   for _ in range(30)]
        for _ in range(30):
            sock = context.wrap_socket(connect(est_server), server_hostname="127.0.0.1")
            sock.sendall(f"POST {WELL_KNOWN}/simpleenroll HTTP/1.1\r\nHost: x\r\n".encode())
            opened.append(sock)

        started = time.monotonic()
        reply = enroll(est_server, boot, new_key())
        took = time.monotonic() - started

        assert reply.status == 200, reply.text
        assert not any(dropped(sock) for sock in opened[:300])  # all of them were held
    record_property("enroll_seconds_with_360_idle", round(took, 3))
    print(f"enrollment beside 360 idle connections: {took * 1000:.0f} ms")


def test_a_renewal_gets_through_beside_2000_idle_connections(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path,
        record_property: pytest.RecordProperty) -> None:
    """2,000 connections that never send a byte, from 2,000 addresses, against one worker
    of 1,000 places (the default), so the worker is certainly full (two workers share them
    unevenly, and a renewal may land on the one with room): a device renews all the same,
    because a full worker gives the place quiet longest to the newcomer."""
    descriptors_for(2_100)
    with running_est_server(tmp_path / "server", est_pki, certificate_lifetime="1h",
                            server_table={"workers": 1}) as server, sockets() as opened:
        boot = registered(server, tmp_path, factory_ca, "renew-beside-idle")
        key = new_key()
        reply = enroll(server, boot, key)
        assert reply.status == 200, reply.text
        current = save_identity(tmp_path, "operational", "renew-beside-idle",
                                reply.certificates()[0], key)

        opened += [connect(server, f"127.3.{i // 200}.{i % 200 + 1}") for i in range(2_000)]
        deadline = time.monotonic() + 30
        while sum(dropped(sock) for sock in opened) < 1_000:
            assert time.monotonic() < deadline, "the worker never took the 2,000 connections"
            time.sleep(0.1)

        new = new_key()
        started = time.monotonic()
        try:
            renewed = post(server, "simplereenroll",
                           base64.encodebytes(csr_der(new, "renew-beside-idle")), current,
                           timeout=5)
        except (*TLS_REFUSED, TimeoutError) as exc:
            pytest.fail(f"the renewal did not get through 2,000 idle connections: {exc!r}")
        took = time.monotonic() - started

        assert renewed.status == 200, renewed.text
        [certificate] = renewed.certificates()
        assert certificate.public_key() == new.public_key()
        assert certificate.serial_number != current.certificate.serial_number
        assert took < 5
        record_property("renew_seconds_beside_2000_idle", round(took, 3))
        print(f"renewal beside 2,000 idle connections: {took * 1000:.0f} ms")
    totals = stopped_totals(server)
    assert totals["connection-evicted"] >= 1_001  # 1,000 idle ones, then one for the device
    assert totals["connection-limit"] == 0


def test_silent_and_slow_connections_are_closed(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path) -> None:
    """Timeouts of 2 s: no handshake, no request, half a request head, half a body; a slow
    body from a stranger is never waited for, since the certificate is checked first."""
    with running_est_server(tmp_path / "server", est_pki, server_table=FAST) as server, \
            sockets() as opened:
        idle = worker_sockets(server)
        boot = registered(server, tmp_path, factory_ca, "slow-dev")
        context = client_context(server, None)
        silent = connect(server)
        quiet = context.wrap_socket(connect(server), server_hostname="127.0.0.1")
        half_head = context.wrap_socket(connect(server), server_hostname="127.0.0.1")
        half_head.sendall(f"POST {WELL_KNOWN}/simpleenroll HTTP/1.1\r\nHost: x\r\n".encode())
        opened += [silent, quiet, half_head]
        for sock in opened:
            wait_closed(sock, limit=15)

        statuses = []
        for identity in (boot, None):
            connection = http.client.HTTPSConnection(
                "127.0.0.1", server.port, timeout=10, context=client_context(server, identity))
            connection.putrequest("POST", f"{WELL_KNOWN}/simpleenroll")
            connection.putheader("Content-Type", "application/pkcs10")
            connection.putheader("Content-Length", "1000")
            connection.endheaders(b"MIIB")
            statuses.append(connection.getresponse().status)
            connection.close()
        assert statuses == [408, 401]
        with server.registry() as registry:
            assert [e.status for e in registry.audit_log("slow-dev")][-1] == 408

        [timeout] = refused(server, "tls-timeout")[:1]
        assert timeout["peer"] == "127.0.0.1"
        held_until(lambda: [worker_sockets(server)], [idle])


def test_failed_handshakes_are_counted_with_the_peer_address(
        est_pki: pki.PKIPaths, tmp_path: Path) -> None:
    """Clients whose certificate comes from a CA of the same name but another key: each is
    refused by TLS, each is counted, and the log says who, once per interval per worker."""
    fake = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)
    key = new_key()
    forged = save_identity(tmp_path, "forged", "forged-dev",
                           fake.issue_client("forged-dev", key.public_key(),
                                             dt.timedelta(days=1)), key)
    csr = base64.encodebytes(csr_der(new_key(), "forged-dev"))
    with running_est_server(tmp_path / "server", est_pki, server_table=FAST) as server:
        idle = worker_sockets(server)
        started = time.monotonic()
        for _ in range(30):
            with pytest.raises(TLS_REFUSED):
                post(server, "simpleenroll", csr, forged)
        time.sleep(0.5)
        lines = refused(server, "tls-failed")
        window = time.monotonic() - started
        assert 1 <= len(lines) <= 2 * (window // 2 + 1)
        assert {(e["peer"], e["listener"]) for e in lines} == {("127.0.0.1", "est")}
        with server.registry() as registry:
            assert registry.audit_log(limit=1_000_000) == []
        held_until(lambda: [worker_sockets(server)], [idle])
    assert stopped_totals(server)["tls-failed"] == 30


def test_a_full_worker_evicts_the_connection_quiet_longest(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path) -> None:
    """One worker, 4 connections per address, 12 in all: a fifth from one address is
    dropped at accept; past 12, the connection silent longest makes room for the newcomer, so
    a device gets in at once, and one halfway through a request is never the one to go."""
    limits = {"workers": 1, "max_connections": 12, "max_connections_per_peer": 4,
              "handshake_timeout": 60, "idle_timeout": 60}
    with running_est_server(tmp_path / "server", est_pki, server_table=limits) as server, \
            ExitStack() as stack:
        idle = worker_sockets(server)
        boot = registered(server, tmp_path, factory_ca, "bounded-dev")
        busy = stack.enter_context(client_context(server, None).wrap_socket(
            connect(server, "127.0.0.20"), server_hostname="127.0.0.1"))
        busy.sendall(f"POST {WELL_KNOWN}/simpleenroll HTTP/1.1\r\nHost: x\r\n".encode())
        one_address = [stack.enter_context(connect(server, "127.0.0.2")) for _ in range(10)]
        held_until(lambda: [sum(not dropped(s) for s in one_address)], [4])
        many = [stack.enter_context(connect(server, f"127.0.0.{i}")) for i in range(3, 13)]
        # 1 busy + 4 + 10 = 15 for 12 places: the three oldest silent ones go
        held_until(lambda: [sum(not dropped(s) for s in group) for group in (one_address, many)],
                   [1, 10])
        reply = enroll(server, boot, new_key())
        assert reply.status == 200, reply.text
        assert [sum(not dropped(s) for s in group) for group in (one_address, many)] == [0, 10]

        busy.sendall(b"Content-Type: application/pkcs10\r\nContent-Length: 4\r\n\r\nMIIB")
        answer = http.client.HTTPResponse(busy)  # type: ignore[arg-type]
        answer.begin()
        assert answer.status == 401
        assert {e["peer"] for e in refused(server, "connection-evicted")} == {"127.0.0.2"}
        answer.close()  # its file holds the socket open
        stack.close()  # every socket refused, evicted or served is closed again
        held_until(lambda: [worker_sockets(server)], [idle])
    totals = stopped_totals(server)
    assert (totals["peer-connection-limit"], totals["connection-evicted"],
            totals["connection-limit"]) == (6, 4, 0)


def worker_sockets(server: ESTServer) -> int:
    """Sockets the server's workers hold open (their listeners', and connections)."""
    pid = server.process.pid
    workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(os.readlink(fd).startswith("socket:") for worker in workers
               for fd in Path(f"/proc/{worker}/fd").iterdir() if fd.exists())


def held_until(counts: Callable[[], list[int]], wanted: list[int], limit: float = 10) -> None:
    """Until ``counts()`` (connections still open, by group) is ``wanted``: the server accepts
    (and drops) in its own time."""
    deadline = time.monotonic() + limit
    while (held := counts()) != wanted:
        assert time.monotonic() < deadline, f"held {held}, not {wanted}"
        time.sleep(0.05)


class FakeTransport(asyncio.Transport):
    """What admission reads and does to a TCP transport: its peer address, abort()."""

    def __init__(self, name: str, peer: str, aborted: list[str]) -> None:
        super().__init__()
        self.name, self.peer, self.aborted = name, peer, aborted

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 40000) if name == "peername" else default

    def abort(self) -> None:
        self.aborted.append(self.name)


def test_eviction_takes_the_connection_quiet_longest_and_never_a_busy_one() -> None:
    """Three places, two per address. Quiet means no request bytes since admission or
    since the last answer; a connection with a request in progress is passed over, and a
    newcomer is refused when all are busy or its address has its two."""
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    refusals = RefusalLog(lambda *_, **__: None, 60.0, clock=clock)
    listener = GuardedListener("est", ssl.create_default_context(), asyncio.Protocol,
                               ConnectionLimits(10, 3, 2), refusals, clock=clock)
    aborted: list[str] = []

    def arrive(name: str, peer: str) -> _Slot | None:
        now[0] += 1
        return listener.admit(FakeTransport(name, peer, aborted))

    a, b, c = (arrive(name, f"192.0.2.{i}") for i, name in enumerate("abc", 1))
    assert a and b and c
    a.spoke()          # a request in progress
    c.spoke()
    c.answered()       # answered: quiet from now, so younger than b
    assert arrive("d", "192.0.2.4") and aborted == ["b"]
    e = arrive("e", "192.0.2.5")
    assert e and aborted == ["b", "c"]
    e.spoke()
    assert arrive("f", "192.0.2.6") and aborted == ["b", "c", "d"]
    assert listener.by_peer == {"192.0.2.1": 1, "192.0.2.5": 1, "192.0.2.6": 1}

    [f] = [s for s in listener._quiet]
    f.spoke()          # all three busy: the newcomer goes
    assert arrive("g", "192.0.2.7") is None and aborted[3:] == ["g"]
    a.answered()
    assert arrive("h", "192.0.2.5") and aborted[4:] == ["a"]
    assert arrive("i", "192.0.2.5") is None and aborted[5:] == ["i"]  # its address is full
    for slot in (a, b, c):
        slot.release()  # their connection_lost, after the eviction: counted once
    assert listener.open == 3
    assert listener.by_peer == {"192.0.2.5": 2, "192.0.2.6": 1}
    assert refusals.totals == {"connection-evicted": 4, "connection-limit": 1,
                               "peer-connection-limit": 1}


def test_the_descriptor_limit_is_raised_for_every_listener_and_never_lowered() -> None:
    """Room for each listener's connections and accept burst (its backlog); short of it,
    the two share what the hard limit gives."""
    infinity = resource.RLIM_INFINITY
    limits = ConnectionLimits(10, 1000, 256, backlog=1024)
    both = 2 * (1000 + 1024) + DESCRIPTOR_MARGIN
    assert descriptor_plan(1024, 1048576, limits, 2) == (both, limits)
    assert descriptor_plan(65536, 65536, limits, 2) == (65536, limits)
    assert descriptor_plan(1024, infinity, limits, 2) == (both, limits)
    assert descriptor_plan(infinity, infinity, limits, 2) == (infinity, limits)
    each = (4096 - DESCRIPTOR_MARGIN) // 2
    assert descriptor_plan(1024, 4096, limits, 2) == \
        (4096, ConnectionLimits(10, each - each // 2, 256, backlog=each // 2))
    assert descriptor_plan(512, 512, limits, 1) == (512, ConnectionLimits(10, 128, 128, 128))
    assert descriptor_plan(64, 64, limits, 1) == (64, ConnectionLimits(10, 1, 1, 1))


def test_a_worker_raises_its_descriptor_limit_or_says_once_why_not(
        est_pki: pki.PKIPaths, tmp_path: Path) -> None:
    """In a process that starts with a soft limit of 1024, as a login shell has it: raised
    for both listeners of the real server's worker; below what the hard limit allows, lower
    limits and one warning."""
    code = ("import dataclasses, json, resource\n"
            "from provisioning._est_guard import ConnectionLimits, fit_descriptor_limit\n"
            "said = []\n"
            "fitted = fit_descriptor_limit(ConnectionLimits(10, 1000, 256), 2,\n"
            "                              lambda event, **_: said.append(event))\n"
            "print(json.dumps([dataclasses.astuple(fitted),\n"
            "                  resource.getrlimit(resource.RLIMIT_NOFILE)[0], said]))\n")

    def run(soft: int, hard: int) -> list[object]:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            timeout=60, cwd=Path(__file__).parents[1],
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    both = 2 * (1000 + 1024) + DESCRIPTOR_MARGIN
    assert run(1024, 8192) == [[10, 1000, 256, 1024], both, []]
    each = (1024 - DESCRIPTOR_MARGIN) // 2
    assert run(1024, 1024) == [[10, each // 2, each // 2, each // 2], 1024, ["descriptor-limit"]]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
        try:  # the server inherits 1024; the tests after us get ours back
            server = stack.enter_context(running_est_server(
                tmp_path / "server", est_pki, recovery=True, server_table={"workers": 1}))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        [pid] = {e["pid"] for e in events(server, "listening")}
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        [files] = [line.split()[3:5] for line in limits if line.startswith("Max open files")]
        assert int(files[0]) >= min(2 * (1000 + 1024) + DESCRIPTOR_MARGIN, hard)
        assert events(server, "descriptor-limit") == []


CBC = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:" \
      "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES128-SHA256:AES128-SHA256:AES128-SHA"


def handshake(server: ESTServer, ciphers: str | None = None, curve: str | None = None,
              tls12: bool = True) -> str:
    """The suite a TLS 1.2 (or default) client agrees on with the server."""
    context = client_context(server, None)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        context.set_ciphers(ciphers)
    if curve:
        context.set_ecdh_curve(curve)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        cipher = tls.cipher()
        assert cipher is not None
        return cipher[0]


def test_tls12_offers_aead_suites_only(est_server: ESTServer) -> None:
    assert handshake(est_server, "ECDHE-ECDSA-AES128-GCM-SHA256") == \
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert handshake(est_server, "ECDHE-ECDSA-CHACHA20-POLY1305") == \
        "ECDHE-ECDSA-CHACHA20-POLY1305"
    assert handshake(est_server, tls12=False).startswith("TLS_")  # TLS 1.3 by default
    with pytest.raises(ssl.SSLError):
        handshake(est_server, CBC)


def test_tls12_key_exchange_on_the_usual_curves_only(est_server: ESTServer) -> None:
    """A guard more than a fix: OpenSSL's default groups already leave secp256k1 out."""
    assert handshake(est_server, curve="prime256v1")
    with pytest.raises(ssl.SSLError):
        handshake(est_server, curve="secp256k1")

