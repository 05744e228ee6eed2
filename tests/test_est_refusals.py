"""Every refusal: the right status, a reason the client can read, an audit row when a device
can be held to it (none for a request without a usable client certificate), nothing else."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioning import pki
from provisioning.registry import DeviceState

from .est_support import (
    TLS_REFUSED,
    ESTServer,
    Identity,
    Reply,
    bootstrap_identity,
    csr_der,
    enroll,
    new_key,
    post,
    save_identity,
)

pytestmark = pytest.mark.integration


@dataclass
class Kit:
    """Builds the credentials a case needs, for a device of its own."""

    server: ESTServer
    factory: pki.Authority
    directory: Path
    device_id: str

    def bootstrap(self, register: bool = True) -> Identity:
        boot = bootstrap_identity(self.directory, self.factory, self.device_id)
        if register:
            with self.server.registry() as registry:
                registry.register_device(self.device_id, boot.certificate)
        return boot

    def operational(self) -> Identity:
        key = new_key()
        reply = enroll(self.server, self.bootstrap(), key)
        assert reply.status == 200, reply.text
        [cert] = reply.certificates()
        return save_identity(self.directory, "operational", self.device_id, cert, key)

    def csr(self, key: object = None, name: str | None = None) -> bytes:
        return base64.encodebytes(
            csr_der(key or new_key(), name or self.device_id))  # type: ignore[arg-type]


def tampered_csr(kit: Kit) -> bytes:
    der = bytearray(csr_der(new_key(), kit.device_id))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature
    return base64.encodebytes(bytes(der))


def fake_factory_bootstrap(kit: Kit) -> Identity:
    """Same name as the Factory CA, another key: a forgery the TLS layer must catch."""
    fake = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)
    key = new_key()
    cert = fake.issue_client(kit.device_id, key.public_key(), dt.timedelta(days=1))
    return save_identity(kit.directory, "fake", kit.device_id, cert, key)


def revoked_operational(kit: Kit) -> Identity:
    current = kit.operational()
    with kit.server.registry() as registry:
        registry.revoke(current.certificate.serial_number, x509.ReasonFlags.key_compromise)
    return current


def suspended_bootstrap(kit: Kit) -> Identity:
    boot = kit.bootstrap()
    with kit.server.registry() as registry:
        registry.set_state(kit.device_id, DeviceState.SUSPENDED)
    return boot


Setup = Callable[[Kit], tuple[Identity | None, bytes]]


@dataclass(frozen=True)
class Case:
    name: str
    operation: str
    setup: Setup
    status: int | None  # None: the TLS layer drops the connection before any HTTP
    reason: str
    content_type: str = "application/pkcs10"
    audited: bool = True  # False: refused before the registry (no usable client certificate)


CASES = [
    Case("bad base64", "simpleenroll", lambda k: (k.bootstrap(), b"@@ not base64 @@"),
         400, "request body is not valid base64"),
    Case("garbage DER", "simpleenroll",
         lambda k: (k.bootstrap(), base64.encodebytes(b"\x30\x03abc")),
         400, "request body is not a DER PKCS#10 request"),
    Case("CSR signature does not verify", "simpleenroll",
         lambda k: (k.bootstrap(), tampered_csr(k)), 400, "CSR signature does not verify"),
    Case("CSR names another device", "simpleenroll",
         lambda k: (k.bootstrap(), k.csr(name="someone-else")),
         403, "the CSR names 'someone-else', not the authenticated device"),
    Case("bootstrap certificate from an unknown CA", "simpleenroll",
         lambda k: (fake_factory_bootstrap(k), k.csr()), None, "TLS: unknown CA"),
    Case("operational certificate on simpleenroll", "simpleenroll",
         lambda k: (k.operational(), k.csr()),
         403, "simpleenroll takes a bootstrap certificate from the Factory CA", audited=False),
    Case("bootstrap certificate on simplereenroll", "simplereenroll",
         lambda k: (k.bootstrap(), k.csr()),
         403, "simplereenroll takes an operational certificate from the Device CA",
         audited=False),
    Case("revoked certificate", "simplereenroll", lambda k: (revoked_operational(k), k.csr()),
         403, "is revoked (keyCompromise)"),
    Case("suspended device", "simpleenroll", lambda k: (suspended_bootstrap(k), k.csr()),
         403, "is suspended"),
    Case("device not allowlisted", "simpleenroll",
         lambda k: (k.bootstrap(register=False), k.csr()), 403, "is not allowlisted"),
    Case("RSA-1024 key", "simpleenroll",
         lambda k: (k.bootstrap(), k.csr(rsa.generate_private_key(65537, 1024))),  # noqa: S505
         403, "key refused: RSA-1024 is too weak"),
    Case("P-192 key", "simpleenroll",
         lambda k: (k.bootstrap(), k.csr(ec.generate_private_key(ec.SECP192R1()))),
         403, "key refused: EC curve secp192r1 is not accepted"),
    Case("oversized body", "simpleenroll", lambda k: (k.bootstrap(), b"A" * 20000),
         413, "request body larger than 16384 bytes"),
    Case("wrong content type", "simpleenroll", lambda k: (k.bootstrap(), k.csr()),
         415, "content type must be application/pkcs10", "application/x-www-form-urlencoded"),
    Case("no client certificate", "simpleenroll", lambda k: (None, k.csr()),
         401, "no client certificate", audited=False),
    Case("re-enrollment reusing the old key", "simplereenroll",
         lambda k: (lambda op: (op, k.csr(op.private_key)))(k.operational()),
         403, "re-enrollment must use a new key"),
]


def send(server: ESTServer, case: Case, identity: Identity | None, body: bytes) -> Reply:
    try:
        return post(server, case.operation, body, identity, case.content_type)
    except TLS_REFUSED as exc:
        return Reply(0, {}, str(exc).encode())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refusal(case: Case, est_server: ESTServer, factory_ca: pki.Authority, tmp_path: Path,
                 request: pytest.FixtureRequest) -> None:
    device_id = "bad-" + str(CASES.index(case))
    kit = Kit(est_server, factory_ca, tmp_path, device_id)
    identity, body = case.setup(kit)
    with est_server.registry() as registry:
        certificates_before = registry.count_certificates()
        audit_before = len(registry.audit_log(limit=100000))

    reply = send(est_server, case, identity, body)

    with est_server.registry() as registry:
        assert registry.count_certificates() == certificates_before
        new_rows = registry.audit_log(limit=100000)[audit_before:]
    if case.status is None:
        assert reply.status == 0, reply.text
        assert new_rows == []  # no HTTP request ever reached the application
        return
    assert (reply.status, case.reason in reply.text) == (case.status, True), reply.text
    assert ("WWW-Authenticate" in reply.headers) == (reply.status == 401)
    if not case.audited:
        assert new_rows == []
        return
    [row] = new_rows
    assert (row.decision, row.status, row.reason) == ("refused", case.status, reply.text)
    assert row.device_id == (device_id if identity is not None else None)
