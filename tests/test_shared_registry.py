"""Two est-server instances on one PostgreSQL registry (issue 18, item 4).

Real est-server processes (a supervisor and two workers each) share one registry URL.
A storm of file-key devices enrolls through both with the project's EST client,
alternating servers; one server is SIGKILLed mid-storm and its clients go on at the
other. The registry rows then say: every device enrolled, none twice, no
registration lost. A per-device daily budget holds across the instances, asked one
after the other and all at once.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from device_agent.errors import ESTError
from device_agent.est import ESTClient
from device_agent.tls import client_context
from provisioning import est_config, factory_config, pki
from provisioning.registry import CertKind, DeviceState, IssuanceKind, open_registry, serial_hex
from simulator.postgres import PostgreSQL

from .est_support import (
    ESTServer,
    Identity,
    bootstrap_identity,
    csr_der,
    new_key,
    running_est_server,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("given", ["postgresql://est@/registry?host=/run/postgresql",
                                   "postgres://est:secret@db.example:5432/registry",
                                   "registry.sqlite3"])
def test_the_config_takes_a_url_where_a_path_is_given(tmp_path: Path, given: str) -> None:
    path = tmp_path / "est.toml"
    path.write_text(f'[pki]\ndirectory = "pki"\nregistry = "{given}"\n')
    (tmp_path / "factory.toml").write_text(
        f'[pki]\ndirectory = "pki"\nregistry = "{given}"\n[stations]\ndirectory = "st"\n')
    url = given.startswith("postgres")
    for registry in (est_config.load(path).registry,
                     factory_config.load_config(tmp_path / "factory.toml").registry):
        assert registry == (given if url else tmp_path / given)
        assert isinstance(registry, str) == url

DEVICES = 90
CLIENTS = 16
KILL_AFTER = 30       # enrollments done when server A is killed
REENROLLS_PER_DAY = 2


@dataclass
class Outcome:
    device_id: str
    certificate: x509.Certificate | None = None
    attempts: int = 0
    unreachable: int = 0  # attempts that found their server gone
    refusal: str = ""


def client(server: ESTServer, identity: Identity) -> ESTClient:
    return ESTClient(server.base_url, client_context(certfile=identity.cert, keyfile=identity.key,
                                                     cafile=server.pki.server_trust), timeout=30)


def enroll(server: ESTServer, identity: Identity) -> x509.Certificate:
    """simpleenroll with a new file key, through device_agent's EST client."""
    csr = x509.load_der_x509_csr(csr_der(new_key(), identity.device_id))
    return client(server, identity).simpleenroll(csr).certificates[0]


def storm_device(identity: Identity, servers: tuple[ESTServer, ESTServer], first: int,
                 outcome: Outcome) -> Outcome:
    """Enroll at ``servers[first]``; a server that cannot be reached: the other one."""
    turn = first
    while outcome.attempts < 6:
        outcome.attempts += 1
        try:
            outcome.certificate = enroll(servers[turn], identity)
            return outcome
        except ESTError as exc:
            if exc.status is not None:
                outcome.refusal = str(exc)
                return outcome
            outcome.unreachable += 1
            turn = 1 - turn
    outcome.refusal = "no server reachable"
    return outcome


@pytest.fixture
def shared(tmp_path: Path, est_pki: pki.PKIPaths, factory_ca: pki.Authority,
           postgres: PostgreSQL) -> Iterator[tuple[str, ESTServer, ESTServer]]:
    """Servers A and B on one fresh PostgreSQL database, each with its own CRL file."""
    url = postgres.new_database("shared")
    policy = {"certificate_lifetime": "1h", "bootstrap_reenrolls_per_day": REENROLLS_PER_DAY}
    with running_est_server(tmp_path / "a", est_pki, registry=url, **policy) as a, \
            running_est_server(tmp_path / "b", est_pki, registry=url, **policy) as b:
        yield url, a, b


def register(url: str, directory: Path, factory: pki.Authority,
             names: list[str]) -> dict[str, Identity]:
    identities = {name: bootstrap_identity(directory, factory, name) for name in names}
    with open_registry(url) as registry:
        for name, identity in identities.items():
            registry.register_device(name, identity.certificate)
    return identities


def test_device_pki_revokes_a_device_in_a_postgresql_registry(
    tmp_path: Path, postgres: PostgreSQL,
) -> None:
    """The operator's command on the shared registry: registry change and CRL together."""
    paths = pki.init_pki(tmp_path / "pki")
    url = postgres.new_database("operator")
    identity = bootstrap_identity(tmp_path, pki.read_authority(paths.factory_ca), "dev-op")
    device_ca = pki.read_authority(paths.device_ca)
    certificate = device_ca.issue_client("dev-op", new_key().public_key(), dt.timedelta(hours=1))
    command = [str(Path(sys.executable).parent / "device-pki")]
    where = ["--pki", str(paths.base), "--registry", url]
    subprocess.run([*command, "register", "dev-op", "--bootstrap-cert", str(identity.cert),
                    *where], check=True, capture_output=True, timeout=60)
    with open_registry(url) as registry, registry.transaction():
        registry.record_certificate("dev-op", certificate, CertKind.OPERATIONAL)
    subprocess.run([*command, "revoke-device", "dev-op", "--reason", "key-compromise", *where],
                   check=True, capture_output=True, timeout=60)
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None
    with open_registry(url) as registry:
        device = registry.device("dev-op")
        assert device is not None and device.state is DeviceState.SUSPENDED
    assert not paths.registry.exists()  # nothing went to the PKI's SQLite file


def test_a_storm_through_two_servers_one_killed_enrolls_every_device_once(
    shared: tuple[str, ESTServer, ESTServer], tmp_path: Path, factory_ca: pki.Authority,
) -> None:
    url, a, b = shared
    names = [f"storm-{n:03d}" for n in range(DEVICES)]
    identities = register(url, tmp_path / "devices", factory_ca, names)
    outcomes = {name: Outcome(name) for name in names}
    done = threading.Semaphore(0)

    def one(index: int, name: str) -> Outcome:
        try:
            return storm_device(identities[name], (a, b), index % 2, outcomes[name])
        finally:
            done.release()

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one, index, name) for index, name in enumerate(names)]
        for _ in range(KILL_AFTER):
            done.acquire(timeout=120)
        os.killpg(a.process.pid, signal.SIGKILL)  # the supervisor and its workers, at once
        results = [future.result(timeout=300) for future in futures]
    assert a.process.wait(10) == -signal.SIGKILL

    refused = [(o.device_id, o.refusal) for o in results if o.certificate is None]
    assert refused == []
    retried = [o for o in results if o.unreachable]
    assert retried, "the kill came after every client had finished: no retry was tested"
    with open_registry(url) as registry:
        issuances = [i for i in registry.issuances() if i.device_id.startswith("storm-")]
        operational = [c for c in registry.certificates()
                       if c.kind is CertKind.OPERATIONAL and c.device_id.startswith("storm-")]
    # No duplicate issuance: one issuance row per certificate, one first enrollment per
    # device, and one live certificate per device, the one its client holds.
    assert len({(i.issuer, i.serial) for i in issuances}) == len(issuances)
    enrolls = Counter(i.device_id for i in issuances if i.kind is IssuanceKind.ENROLL)
    assert enrolls == Counter(names)
    live = {c.device_id: c.serial for c in operational if not c.revoked}
    assert live == {o.device_id: serial_hex(o.certificate.serial_number)
                    for o in results if o.certificate is not None}
    # A second issuance only where a server died between its commit and its answer, and
    # only for a client that then retried: never a lost registration, never a silent one.
    again = [i.device_id for i in issuances if i.kind is IssuanceKind.BOOTSTRAP_REENROLL]
    assert set(again) <= {o.device_id for o in retried}
    assert len(issuances) == DEVICES + len(again)
    print(f"\n{DEVICES} devices, {len(retried)} retried at B after the kill, "
          f"{len(again)} re-enrolled because the kill lost an answer")


def test_a_per_device_budget_holds_across_instances(
    shared: tuple[str, ESTServer, ESTServer], tmp_path: Path, factory_ca: pki.Authority,
) -> None:
    url, a, b = shared
    identities = register(url, tmp_path / "devices", factory_ca, ["budget-1", "budget-2"])
    one, two = identities["budget-1"], identities["budget-2"]
    enroll(a, one)
    for server in (b, a)[:REENROLLS_PER_DAY]:  # the budget, spent at both servers
        enroll(server, one)
    for server in (b, a):  # beyond it: refused by each, whichever counted the last one
        with pytest.raises(ESTError) as refused:
            enroll(server, one)
        assert refused.value.status == 429 and refused.value.retry_after
    # All at once: three re-enrollments at each server, the budget two in all.
    enroll(b, two)
    start = threading.Barrier(6)

    def burst(server: ESTServer) -> int:
        start.wait()
        try:
            enroll(server, two)
        except ESTError as exc:
            return exc.status or 0
        return 200

    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(burst, [a, b] * 3))
    assert statuses == [200] * REENROLLS_PER_DAY + [429] * (6 - REENROLLS_PER_DAY)
    now = dt.datetime.now(dt.UTC)
    with open_registry(url) as registry:
        for device in ("budget-1", "budget-2"):
            assert len(registry.issued_since(device, IssuanceKind.BOOTSTRAP_REENROLL,
                                             now - dt.timedelta(days=1))) == REENROLLS_PER_DAY
            live = [c for c in registry.certificates(device)
                    if c.kind is CertKind.OPERATIONAL and not c.revoked]
            assert len(live) == 1
