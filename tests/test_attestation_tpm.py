"""Key attestation on real TPMs: swtpm manufactured with EK certificates by swtpm_localca.

The factory half (EK certificate chain, AK creation, credential activation) and
the device half (TPM2_Certify into an attested CSR) against swtpm behind
tpm2-abrmd with the kernel's three-transient limit; tpm2-tools reads our
evidence independently.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_agent import attest
from device_agent.csr_attestation import build_attested_csr, encode_bundle, key_binding
from device_agent.errors import KeyFileError, TPMError
from device_agent.tpm import TPM
from provisioning import attestation as A
from provisioning.est_wire import decode_csr
from simulator.manufacturer import Manufacturer
from simulator.processes import DBusSession, SoftwareTPM, require

from .test_attestation import subject_and_san

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def maker(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer(tmp_path_factory.mktemp("maker"), "maker-a")


@pytest.fixture(scope="module")
def made_tpm(tmp_path_factory: pytest.TempPathFactory, dbus: DBusSession,
             maker: Manufacturer) -> Iterator[SoftwareTPM]:
    """A TPM with EK certificates, behind tpm2-abrmd limited like /dev/tpmrm0."""
    with SoftwareTPM(tmp_path_factory.mktemp("made-tpm"), dbus, "made", max_transients=3,
                     manufacturer=maker) as tpm:
        yield tpm


@pytest.fixture(scope="module")
def ak(made_tpm: SoftwareTPM) -> attest.AttestationKeyBlob:
    with TPM(made_tpm.tcti) as tpm:
        return attest.create_attestation_key(tpm)


def factory_check(tpm: TPM, maker: Manufacturer, ak: attest.AttestationKeyBlob,
                  kinds: tuple[str, ...] | None = None) -> bool:
    """The factory's sequence: EK certificate chain, EK, credential activation of the AK."""
    endorsement = attest.read_endorsement(tpm, kinds)
    certificate = x509.load_der_x509_certificate(endorsement.certificate)
    A.verify_ek_certificate(certificate, [maker.root], [maker.issuer])
    with attest.endorsement_key(tpm, endorsement) as (_, ek_public):
        ek = A.check_ek_matches(ek_public, certificate)
    ak_public = A.parse_public(ak.public_area)
    A.check_attestation_key(ak_public)
    secret = os.urandom(32)
    blob, encrypted = A.make_credential(ek, ak_public.name, secret)
    return attest.activate_credential(tpm, ak, endorsement, blob, encrypted) == secret


# --- the factory ---

def test_a_manufactured_tpm_holds_ek_certificates_of_its_maker(
        made_tpm: SoftwareTPM, maker: Manufacturer) -> None:
    with TPM(made_tpm.tcti) as tpm:
        endorsement = attest.read_endorsement(tpm)
        with attest.endorsement_key(tpm, endorsement) as (_, ek_public):
            certificate = x509.load_der_x509_certificate(endorsement.certificate)
            A.check_ek_matches(ek_public, certificate)
    assert endorsement.kind == "EK-HIGH-ECC384"  # swtpm 0.7: RSA 2048 and ECC P-384
    chain = A.verify_ek_certificate(certificate, [maker.root], [maker.issuer])
    assert chain[-1] == maker.root


@pytest.mark.parametrize("kind", ["EK-HIGH-ECC384", "EK-RSA2048"])
def test_credential_activation_proves_the_ak_lives_beside_the_ek(
        made_tpm: SoftwareTPM, maker: Manufacturer, ak: attest.AttestationKeyBlob,
        kind: str) -> None:
    with TPM(made_tpm.tcti) as tpm:
        assert factory_check(tpm, maker, ak, (kind,))


def test_a_credential_made_for_another_object_is_not_released(
        made_tpm: SoftwareTPM, ak: attest.AttestationKeyBlob) -> None:
    with TPM(made_tpm.tcti) as tpm:
        endorsement = attest.read_endorsement(tpm)
        with attest.endorsement_key(tpm, endorsement) as (_, ek_public):
            ek = A.parse_public(ek_public)
        other = A.parse_public(attest.create_attestation_key(tpm).public_area)
        blob, encrypted = A.make_credential(ek, other.name, b"s" * 32)
        with pytest.raises(TPMError):
            attest.activate_credential(tpm, ak, endorsement, blob, encrypted)


def test_a_tpm_of_an_unknown_maker_is_refused_and_cannot_activate_for_another_ek(
        tmp_path: Path, made_tpm: SoftwareTPM, maker: Manufacturer) -> None:
    stranger = Manufacturer(tmp_path / "maker-b", "maker-b")
    with SoftwareTPM(tmp_path / "tpm-b", None, "b", manufacturer=stranger) as other, \
            TPM(other.tcti) as tpm:
        endorsement = attest.read_endorsement(tpm)
        certificate = x509.load_der_x509_certificate(endorsement.certificate)
        with pytest.raises(A.AttestationError, match="trusted TPM manufacturer"):
            A.verify_ek_certificate(certificate, [maker.root], [maker.issuer])
        A.verify_ek_certificate(certificate, [stranger.root], [stranger.issuer])
        # an AK in this TPM, a credential for the first TPM's EK: not released here
        local_ak = attest.create_attestation_key(tpm)
        with TPM(made_tpm.tcti) as first:
            first_endorsement = attest.read_endorsement(first)
            with attest.endorsement_key(first, first_endorsement) as (_, first_ek):
                ek = A.parse_public(first_ek)
        blob, encrypted = A.make_credential(ek, A.parse_public(local_ak.public_area).name,
                                            b"s" * 32)
        with pytest.raises(TPMError):
            attest.activate_credential(tpm, local_ak, endorsement, blob, encrypted)


def test_a_tpm_without_ek_certificate_is_refused(swtpm: SoftwareTPM) -> None:
    with TPM(swtpm.tcti) as tpm, pytest.raises(TPMError, match="no EK certificate"):
        attest.read_endorsement(tpm)


def test_the_ak_key_file_round_trips_and_a_plain_key_is_no_ak(
        tmp_path: Path, made_tpm: SoftwareTPM, ak: attest.AttestationKeyBlob) -> None:
    path = ak.write(tmp_path / "ak.tss")
    assert attest.AttestationKeyBlob.read(path).public_area == ak.public_area
    with TPM(made_tpm.tcti) as tpm:
        plain = tpm.create_key()
    with pytest.raises(KeyFileError, match="restricted signing key"):
        attest.AttestationKeyBlob(plain.pem)


# --- the device: TPM2_Certify into the CSR ---

def test_tpm_evidence_in_a_tpm_signed_csr_verifies(
        made_tpm: SoftwareTPM, ak: attest.AttestationKeyBlob) -> None:
    subject, extensions = subject_and_san("dev-attested")
    with TPM(made_tpm.tcti) as tpm:
        blob = tpm.create_key()
        statement = attest.certify(tpm, ak, blob)
        with tpm.loaded(blob) as key:
            csr = build_attested_csr(key, subject, extensions, encode_bundle([statement]))
    parsed = decode_csr(base64.b64encode(csr.public_bytes(serialization.Encoding.DER)))
    result = A.verify_csr_attestation(parsed, ak.public_area)
    assert result is not None
    assert result.name == A.parse_public(statement.public).name
    assert csr.public_key() == blob.public_key()


def test_real_evidence_replayed_into_a_csr_for_a_new_key_is_refused(
        made_tpm: SoftwareTPM, ak: attest.AttestationKeyBlob) -> None:
    subject, extensions = subject_and_san("dev-replay")
    with TPM(made_tpm.tcti) as tpm:
        statement = attest.certify(tpm, ak, tpm.create_key())
        fresh = tpm.create_key()
        with tpm.loaded(fresh) as key:
            csr = build_attested_csr(key, subject, extensions, encode_bundle([statement]))
    with pytest.raises(A.AttestationError, match="another key"):
        A.verify_csr_attestation(csr, ak.public_area)


def test_evidence_of_another_tpms_ak_is_refused(
        made_tpm: SoftwareTPM, ak: attest.AttestationKeyBlob) -> None:
    with TPM(made_tpm.tcti) as tpm:
        blob = tpm.create_key()
        statement = attest.certify(tpm, attest.create_attestation_key(tpm), blob)
    with pytest.raises(A.AttestationError, match="does not verify"):
        A.verify_certify(statement, ak.public_area, blob.public_key())


# --- tpm2-tools, independently ---

def tools(swtpm: SoftwareTPM, *argv: str, failing: str | None = None) -> str:
    """Run a tpm2-tools program on ``swtpm``; ``failing``: the error an older release is
    known to end with (a newer one may succeed)."""
    result = subprocess.run([require(argv[0]), *argv[1:]], capture_output=True, text=True,
                            env={**os.environ, **swtpm.env, "PATH": "/usr/bin:/bin"},
                            check=False, timeout=30)
    if failing is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 0 or failing in result.stderr, result.stderr
    return result.stdout


def line(output: str, key: str) -> str:
    """The value of ``key`` in tpm2-tools' YAML-like output, hex without 0x, lower case."""
    value = next(row.split(":", 1)[1].strip() for row in output.splitlines()
                 if row.strip().startswith(f"{key}:"))
    return value.lower().removeprefix("0x")


def tools_load(swtpm: SoftwareTPM, key: object, directory: Path, name: str) -> Path:
    tss = key.tss_key  # type: ignore[attr-defined]
    (directory / f"{name}.pub").write_bytes(tss.public.marshal())
    (directory / f"{name}.priv").write_bytes(tss.private.marshal())
    tools(swtpm, "tpm2_load", "-T", swtpm.tcti, "-C", "0x81000001",
          "-u", str(directory / f"{name}.pub"), "-r", str(directory / f"{name}.priv"),
          "-c", str(directory / f"{name}.ctx"))
    return directory / f"{name}.ctx"


def test_tpm2_tools_read_and_verify_our_evidence(
        tmp_path: Path, made_tpm: SoftwareTPM, ak: attest.AttestationKeyBlob) -> None:
    with TPM(made_tpm.tcti) as tpm:
        blob = tpm.create_key()
        statement = attest.certify(tpm, ak, blob)
    attest_bin, sig_bin = tmp_path / "attest.bin", tmp_path / "sig.bin"
    attest_bin.write_bytes(statement.attest)
    sig_bin.write_bytes(statement.signature)
    ak_ctx = tools_load(made_tpm, ak, tmp_path, "ak")
    key_ctx = tools_load(made_tpm, blob, tmp_path, "key")
    ak_read = tools(made_tpm, "tpm2_readpublic", "-T", made_tpm.tcti, "-c", str(ak_ctx))
    key_read = tools(made_tpm, "tpm2_readpublic", "-T", made_tpm.tcti, "-c", str(key_ctx))

    # tpm2_print (tools 5.4) reads the header and stops at the certify union; 5.7 prints all
    printed = tools(made_tpm, "tpm2_print", "-t", "TPMS_ATTEST", str(attest_bin),
                    failing="unsupported type 0x8017")
    assert line(printed, "magic") == "ff544347"
    assert line(printed, "type") in ("8017", "tpm2_st_attest_certify")
    assert line(printed, "qualifiedSigner") == line(ak_read, "qualified name")
    assert line(printed, "extraData") == key_binding(blob.public_key()).hex()

    # the TPM checks the AK's signature over exactly our bytes
    tools(made_tpm, "tpm2_verifysignature", "-T", made_tpm.tcti, "-c", str(ak_ctx),
          "-g", "sha256", "-m", str(attest_bin), "-s", str(sig_bin))

    # tpm2_certify of the same key by the same AK attests the same name and qualified name
    tools(made_tpm, "tpm2_certify", "-T", made_tpm.tcti, "-c", str(key_ctx), "-C", str(ak_ctx),
          "-g", "sha256", "-o", str(tmp_path / "tools.attest"), "-s", str(tmp_path / "tools.sig"))
    theirs = (tmp_path / "tools.attest").read_bytes()
    name = bytes.fromhex(line(key_read, "name"))
    assert statement.attest.endswith(len(name).to_bytes(2, "big") + name + theirs[-36:])
    assert theirs[-72:] == statement.attest[-72:]
