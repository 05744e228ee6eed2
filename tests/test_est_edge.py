"""The est-server's edge, as a stranger meets it: challenges, floods, idle and slow
connections, connection limits, failed handshakes, and the TLS 1.2 suites on offer.

What a client that never authenticates can do must cost the registry nothing (no
lock, no audit row, not a byte of file) and cost the log one line per kind per
interval, with a count; what it can hold (sockets, handshakes, half-sent requests)
is bounded in time and in number.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from device_agent.errors import ConfigError
from provisioning import est_config, pki
from provisioning._est_guard import RefusalLog

from .est_support import (
    TLS_REFUSED,
    WELL_KNOWN,
    ESTServer,
    Identity,
    Reply,
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


def test_silent_and_slow_connections_are_closed(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path) -> None:
    """Timeouts of 2 s: no handshake, no request, half a request head, half a body; a slow
    body from a stranger is never waited for, since the certificate is checked first."""
    with running_est_server(tmp_path / "server", est_pki, server_table=FAST) as server, \
            sockets() as opened:
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
    assert stopped_totals(server)["tls-failed"] == 30


def test_connections_are_bounded_per_address_and_in_total(
        est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path) -> None:
    """One worker, 4 connections per address, 12 in all: the rest are dropped at accept,
    and a device gets in again once the idle ones are gone."""
    limits = {"workers": 1, "max_connections": 12, "max_connections_per_peer": 4,
              "handshake_timeout": 60}
    with running_est_server(tmp_path / "server", est_pki, server_table=limits) as server, \
            ExitStack() as stack:
        boot = registered(server, tmp_path, factory_ca, "bounded-dev")
        one_address = [stack.enter_context(connect(server, "127.0.0.2")) for _ in range(10)]
        many = [stack.enter_context(connect(server, f"127.0.0.{i}")) for i in range(3, 13)]
        deadline = time.monotonic() + 10
        while (held := [sum(not dropped(s) for s in group) for group in (one_address, many)]) \
                != [4, 8] and time.monotonic() < deadline:
            time.sleep(0.1)  # until the server has accepted (and dropped) them all
        assert held == [4, 8]
        with pytest.raises(TLS_REFUSED):
            enroll(server, boot, new_key())
        assert refused(server, "peer-connection-limit")[0]["peer"] == "127.0.0.2"
        assert refused(server, "connection-limit")

        stack.close()
        deadline = time.monotonic() + 10
        reply: Reply | None = None
        while reply is None:
            try:
                reply = enroll(server, boot, new_key())
            except TLS_REFUSED:
                assert time.monotonic() < deadline, "the slots were never given back"
                time.sleep(0.1)
        assert reply.status == 200, reply.text


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

