"""Key attestation end to end: a manufactured swtpm, the factory, the credential job, est-server.

The factory proves the TPM's maker and its AK; the device's credential job
sends TPM2_Certify evidence in every CSR; est-server with
``key_attestation = "required"`` verifies it against the registered AK, marks
the certificate with the attested-key policy and the registry row as attested.
Each refusal is a real request to the real server: 403 with its reason, one
audit row, nothing issued.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPMS_SCHEME_HASH, TPMT_SIG_SCHEME, TPMU_SIG_SCHEME

from device_agent import attest
from device_agent.config import AgentConfig
from device_agent.csr_attestation import (
    TpmCertifyStatement,
    build_attested_csr,
    encode_bundle,
    key_binding,
)
from device_agent.job_process import order
from device_agent.tpm import TPM, KeyBlob, csr_names
from provisioning import pki
from provisioning.attestation import ATTESTED_KEY_POLICY, parse_public
from provisioning.factory import LineSettings, LocalFactoryCA, provision
from provisioning.registry import AttestationKey, CertKind, registrar
from simulator.manufacturer import Manufacturer
from simulator.processes import SoftwareTPM

from .est_support import (
    ESTServer,
    Identity,
    bootstrap_identity,
    csr_der,
    new_key,
    post,
    running_est_server,
)

pytestmark = pytest.mark.integration
LIFETIME = 6  # seconds: renewal at once, recovery after expiry, in one short test


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           est_pki: pki.PKIPaths) -> Iterator[ESTServer]:
    with running_est_server(tmp_path_factory.mktemp("attesting-est"), est_pki, recovery=True,
                            certificate_lifetime=f"{LIFETIME}s",
                            key_attestation="required") as running:
        yield running


def policies(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        found = certificate.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return []
    return [p.policy_identifier for p in found]


def job(config: Path, tpm: SoftwareTPM, work: str,
        generation: int | None = None) -> dict[str, object]:
    """The agent's credential job, as the agent starts it: the order and the configuration
    on stdin."""
    result = subprocess.run(
        [sys.executable, "-m", "device_agent.credential_job"],
        input=order(work, generation, True, config, config.read_text()),
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **tpm.env, "TSS2_LOG": "all+none"})
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


# --- end to end ------------------------------------------------------------------------


def test_attested_enrollment_renewal_recovery_and_reenrollment(
    tmp_path: Path, server: ESTServer, est_pki: pki.PKIPaths, made_swtpm: SoftwareTPM,
    manufacturer: Manufacturer,
) -> None:
    line = LineSettings(est_url=server.base_url, broker_host="127.0.0.1", broker_port=8883,
                        server_trust=est_pki.server_trust, state_dir=tmp_path / "state",
                        api_socket=None, recovery_url=server.recovery_url,
                        manufacturer_roots=(manufacturer.root,),
                        manufacturer_intermediates=(manufacturer.issuer,))
    provision("att-e2e", made_swtpm.tcti, tmp_path / "etc", LocalFactoryCA(est_pki), line,
              registrar(server.registry_path))
    config = tmp_path / "etc" / "agent.toml"
    assert AgentConfig.load(config).paths.attestation_key == tmp_path / "etc" / "attestation.tss"

    answers = [job(config, made_swtpm, "enroll")]
    answers.append(job(config, made_swtpm, "renew", 1))
    renewed = AgentConfig.load(config).paths.state_dir / "credentials" / "gen-000002"
    expiry = x509.load_pem_x509_certificate((renewed / "cert.pem").read_bytes())
    time.sleep(max(0.0, (expiry.not_valid_after_utc - dt.datetime.now(dt.UTC))
                   .total_seconds() + 1.0))
    answers.append(job(config, made_swtpm, "recovery", 2))
    answers.append(job(config, made_swtpm, "bootstrap"))
    assert answers == [{"outcome": "issued", "generation": n} for n in (1, 2, 3, 4)], answers

    credentials = AgentConfig.load(config).paths.state_dir / "credentials"
    issued = [x509.load_pem_x509_certificate((credentials / f"gen-{n:06d}" / "cert.pem")
                                             .read_bytes()) for n in (1, 2, 3, 4)]
    assert all(policies(cert) == [ATTESTED_KEY_POLICY] for cert in issued)
    with server.registry() as registry:
        records = [c for c in registry.certificates("att-e2e") if c.kind is CertKind.OPERATIONAL]
        kinds = [i.kind.value for i in registry.issuances("att-e2e")]
    assert len(records) == 4 and all(c.attested for c in records)
    assert kinds == ["enroll", "renew", "recover", "bootstrap-reenroll"]


# --- refusals ----------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """A device on record with an AK in the made TPM; its TLS identity is a file key."""

    server: ESTServer
    tpm: TPM
    ak: attest.AttestationKeyBlob
    boot: Identity

    def register_ak(self, device_id: str, public_area: bytes) -> None:
        with self.server.registry() as registry:
            registry.register_attestation_key(AttestationKey(
                device_id, public_area, parse_public(public_area).name, "0" * 64))

    def csr(self, blob: KeyBlob, statement: TpmCertifyStatement) -> bytes:
        subject, names = csr_names(self.boot.device_id)
        with self.tpm.loaded(blob) as key:
            csr = build_attested_csr(key, subject, [x509.Extension(names.oid, False, names)],
                                     encode_bundle([statement]))
        return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def tpm(made_swtpm: SoftwareTPM) -> Iterator[TPM]:
    with TPM(made_swtpm.tcti) as opened:
        yield opened


@pytest.fixture(scope="module")
def device_ak(tpm: TPM) -> attest.AttestationKeyBlob:
    return attest.create_attestation_key(tpm)


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path, server: ESTServer,
          factory_ca: pki.Authority, tpm: TPM,
          device_ak: attest.AttestationKeyBlob) -> Setup:
    device_id = "att-" + request.node.name.removeprefix("test_")[:40].replace("_", "-")
    boot = bootstrap_identity(tmp_path, factory_ca, device_id)
    with server.registry() as registry:
        registry.register_device(device_id, boot.certificate)
    made = Setup(server, tpm, device_ak, boot)
    made.register_ak(device_id, device_ak.public_area)
    return made


def refused(setup: Setup, body: bytes, reason: str) -> None:
    """403 with ``reason``, one audit row saying the same, no certificate issued."""
    device_id = setup.boot.device_id
    with setup.server.registry() as registry:
        before = len(registry.audit_log(device_id))
    reply = post(setup.server, "simpleenroll", body, setup.boot)
    assert (reply.status, reason in reply.text) == (403, True), reply.text
    with setup.server.registry() as registry:
        rows = registry.audit_log(device_id)[before:]
        issued = [c for c in registry.certificates(device_id) if c.kind is CertKind.OPERATIONAL]
        issuances = registry.issuances(device_id)
    assert [(r.action, r.decision, r.status, r.reason, r.issued_serial) for r in rows] == \
        [("simpleenroll", "refused", 403, reply.text, None)]
    assert (issued, issuances) == ([], [])


def test_the_same_device_with_its_evidence_is_issued(setup: Setup) -> None:
    """The refusals' control: nothing else differs."""
    blob = setup.tpm.create_key()
    reply = post(setup.server, "simpleenroll",
                 setup.csr(blob, attest.certify(setup.tpm, setup.ak, blob)), setup.boot)
    assert reply.status == 200, reply.text
    assert policies(reply.certificates()[0]) == [ATTESTED_KEY_POLICY]


def test_no_evidence_when_required_is_refused(setup: Setup) -> None:
    body = base64.encodebytes(csr_der(new_key(), setup.boot.device_id))  # a software key
    refused(setup, body, "key attestation required: the CSR carries no TPM evidence")


def test_evidence_from_another_devices_ak_is_refused(setup: Setup) -> None:
    others = attest.create_attestation_key(setup.tpm)
    blob = setup.tpm.create_key()
    refused(setup, setup.csr(blob, attest.certify(setup.tpm, others, blob)),
            "does not verify with the device's AK")


def test_evidence_for_a_different_key_is_refused(setup: Setup) -> None:
    certified, fresh = setup.tpm.create_key(), setup.tpm.create_key()
    replayed = attest.certify(setup.tpm, setup.ak, certified)
    refused(setup, setup.csr(fresh, replayed), "made for another key")


def test_a_tampered_public_area_is_refused(setup: Setup) -> None:
    blob = setup.tpm.create_key()
    statement = attest.certify(setup.tpm, setup.ak, blob)
    area = bytearray(statement.public)
    area[7] ^= 1 << 6  # objectAttributes (bytes 4-7), userWithAuth: the name changes
    tampered = dataclasses.replace(statement, public=bytes(area))
    refused(setup, setup.csr(blob, tampered), "attested name is not the name of the public area")


def test_a_non_restricted_signing_key_posing_as_ak_is_refused(setup: Setup) -> None:
    """A plain signing key can sign a forged TPMS_ATTEST as well as a real one, so even a
    genuine TPM2_Certify by it (made here) proves nothing: the registered "AK" is refused."""
    poser, blob = setup.tpm.create_key(), setup.tpm.create_key()
    setup.register_ak(setup.boot.device_id, bytes(poser.tss_key.public.publicArea.marshal()))
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA, details=TPMU_SIG_SCHEME(
        ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)))
    tpm = setup.tpm
    with tpm.lock, attest._loaded(tpm, blob.tss_key.private, blob.tss_key.public, "key") as key, \
            attest._loaded(tpm, poser.tss_key.private, poser.tss_key.public, "poser") as signer:
        signed, signature = tpm.esapi.certify(key, signer, key_binding(blob.public_key()), scheme)
    statement = TpmCertifyStatement(bytes(signed), bytes(signature.marshal()),
                                    bytes(blob.tss_key.public.publicArea.marshal()))
    refused(setup, setup.csr(blob, statement), "not a restricted signing key")
