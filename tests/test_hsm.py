"""CA keys in a PKCS#11 token (SoftHSM2): made in the token, never extractable, and
used by device-pki, the factory and the real est-server wherever a key file was."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import hsm, pki
from provisioning.errors import PKIError
from provisioning.factory import LocalFactoryCA
from provisioning.registry import CertKind, open_registry, serial_hex

from .est_support import (
    bootstrap_identity,
    enroll,
    new_key,
    recover,
    running_est_server,
    save_identity,
)
from .hsm_support import SoftHSM, softhsm  # noqa: F401 - the fixture

DEVICE_PKI = str(Path(sys.executable).parent / "device-pki")
HOUR = dt.timedelta(hours=1)


def device_pki(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DEVICE_PKI, *map(str, args)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode == 0) == ok, result.stderr
    return result


@pytest.fixture
def token_pki(softhsm: SoftHSM, tmp_path: Path) -> pki.PKIPaths:  # noqa: F811
    device_pki("init", tmp_path / "pki", "--pkcs11", softhsm.uri())
    return pki.PKIPaths(tmp_path / "pki")


@pytest.fixture
def device_ca(token_pki: pki.PKIPaths) -> Iterator[pki.Authority]:
    with pki.open_authority(token_pki.device_ca) as authority:
        yield authority


def files_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


# --- device-pki init --pkcs11 -------------------------------------------------------------


def test_init_makes_the_ca_keys_in_the_token_unextractable(
    softhsm: SoftHSM, token_pki: pki.PKIPaths,  # noqa: F811
) -> None:
    for ca in (token_pki.device_ca, token_pki.factory_ca):
        assert not (ca / "ca.key").exists()
        uri = (ca / pki.KEY_URI_FILE).read_text()
        assert uri.startswith(f"pkcs11:token=ca;object={ca.name};id=")
        assert (ca / pki.KEY_URI_FILE).stat().st_mode & 0o077 == 0
    assert (token_pki.root / "ca.key").exists()  # the operator root stays a file
    module = pkcs11.lib(softhsm.module)
    try:
        token = module.get_token(token_label="ca")
        with token.open(user_pin=softhsm.pin) as session:
            keys = {key.label: key for key in session.get_objects(
                {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})}
            assert sorted(keys) == ["device-ca", "factory-ca"]
            for key in keys.values():
                attribute = pkcs11.Attribute
                assert (key[attribute.TOKEN], key[attribute.SENSITIVE],
                        key[attribute.EXTRACTABLE], key[attribute.NEVER_EXTRACTABLE],
                        key[attribute.ALWAYS_SENSITIVE], key[attribute.PRIVATE]) == \
                    (True, True, False, True, True, True)
                with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                    key[attribute.VALUE]
    finally:
        module.finalize()
    listing = softhsm.tool("--list-objects", "--type", "privkey")
    print(listing)  # pkcs11-tool's view, for the record
    assert "label:      device-ca" in listing and "label:      factory-ca" in listing


def test_token_signed_certificates_and_crls_verify(
    token_pki: pki.PKIPaths, device_ca: pki.Authority,
) -> None:
    assert isinstance(device_ca.key, hsm.TokenECKey)
    root = pki.load_certs(token_pki.root / "ca.pem")[0]
    device_ca.certificate.verify_directly_issued_by(root)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = device_ca.issue_client("hsm-0001", key.public_key(), HOUR)
    cert.verify_directly_issued_by(device_ca.certificate)
    crl = pki.build_crl(device_ca, [pki.Revocation(cert.serial_number, pki._now())], 7,
                        pki._now())
    assert crl.is_signature_valid(device_ca.certificate.public_key())
    # the CRL device-pki init published, signed in the token by another process
    published = x509.load_pem_x509_crl(token_pki.crl.read_bytes())
    assert published.is_signature_valid(device_ca.certificate.public_key())

    with LocalFactoryCA(token_pki) as factory:
        assert isinstance(factory.authority.key, hsm.TokenECKey)
        factory_cert = factory.authority.certificate
        factory_cert.verify_directly_issued_by(factory_cert)
        boot = factory.authority.issue_client("hsm-0001", key.public_key(), HOUR)
        boot.verify_directly_issued_by(factory_cert)


def test_device_pki_revoke_publishes_a_token_signed_crl(
    token_pki: pki.PKIPaths, device_ca: pki.Authority, tmp_path: Path,
) -> None:
    cert = device_ca.issue_client("hsm-0002", new_key().public_key(), HOUR)
    with LocalFactoryCA(token_pki) as factory:
        boot = bootstrap_identity(tmp_path / "dev", factory.authority, "hsm-0002")
    device_pki("register", "hsm-0002", "--bootstrap-cert", boot.cert, "--pki", token_pki.base)
    with open_registry(token_pki.registry) as registry, registry.transaction():
        registry.record_certificate("hsm-0002", cert, CertKind.OPERATIONAL)

    device_pki("revoke", f"{cert.serial_number:x}", "--reason", "keyCompromise",
               "--pki", token_pki.base)

    crl = x509.load_pem_x509_crl(token_pki.crl.read_bytes())
    assert crl.is_signature_valid(device_ca.certificate.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


# --- the real est-server with its Device CA key in the token ------------------------------


@pytest.mark.integration
def test_enrollment_renewal_and_recovery_through_est_server(
    token_pki: pki.PKIPaths, device_ca: pki.Authority, tmp_path: Path,
) -> None:
    with LocalFactoryCA(token_pki) as factory, \
            running_est_server(tmp_path / "est", token_pki, recovery=True,
                               certificate_lifetime="1h") as server:
        boot = bootstrap_identity(tmp_path / "dev", factory.authority, "hsm-est-1")
        with server.registry() as registry:
            registry.register_device("hsm-est-1", boot.certificate)

        key = new_key()
        reply = enroll(server, boot, key)
        assert reply.status == 200, reply.text
        [first] = reply.certificates()
        first.verify_directly_issued_by(device_ca.certificate)
        current = save_identity(tmp_path / "dev", "gen-0", "hsm-est-1", first, key)

        key = new_key()
        reply = enroll(server, current, key, "simplereenroll")
        assert reply.status == 200, reply.text
        [renewed] = reply.certificates()
        renewed.verify_directly_issued_by(device_ca.certificate)
        assert renewed.public_key() == key.public_key()

        # switched off past expiry: an expired certificate on record, then recovery
        old_key = new_key()
        expired = device_ca.issue_client("hsm-est-1", old_key.public_key(), HOUR,
                                         not_before=pki._now() - 3 * HOUR)
        with server.registry() as registry:
            registry.record_certificate("hsm-est-1", expired, CertKind.OPERATIONAL)
        gone = save_identity(tmp_path / "dev", "expired", "hsm-est-1", expired, old_key)
        key = new_key()
        reply = recover(server, gone, key)
        assert reply.status == 200, reply.text
        [recovered] = reply.certificates()
        recovered.verify_directly_issued_by(device_ca.certificate)

        # the supersedes reach the CRL the worker signs in the token
        assert server.crl is not None
        wanted = {first.serial_number, expired.serial_number}
        crl = None
        for _ in range(100):
            if server.crl.exists():
                crl = x509.load_pem_x509_crl(server.crl.read_bytes())
                if wanted <= {entry.serial_number for entry in crl}:
                    break
            time.sleep(0.1)
        assert crl is not None and wanted <= {entry.serial_number for entry in crl}
        assert crl.is_signature_valid(device_ca.certificate.public_key())
        with server.registry() as registry:
            record = registry.certificate(serial_hex(recovered.serial_number))
        assert record is not None
    assert '"event":"stopped"' in server.log.read_text()


# --- refusals: one PKIError naming the URI without its PIN, nothing written ---------------


@pytest.mark.parametrize("case", ["wrong-pin", "unknown-token", "missing-module", "no-pin"])
def test_init_refusals_write_nothing(softhsm: SoftHSM, tmp_path: Path,  # noqa: F811
                                     case: str) -> None:
    uri = {
        "wrong-pin": softhsm.uri(pin="not-the-pin"),
        "unknown-token": softhsm.uri(pin=softhsm.pin).replace("token=ca", "token=nope"),
        "missing-module": softhsm.uri(pin=softhsm.pin).replace(softhsm.module,
                                                               "/nowhere/libp11.so"),
        "no-pin": f"pkcs11:token=ca?module-path={softhsm.module}",
    }[case]
    expected = {"wrong-pin": "refused the PIN", "unknown-token": "no such token",
                "missing-module": "/nowhere/libp11.so not found", "no-pin": "no PIN"}[case]

    result = device_pki("init", tmp_path / "pki", "--pkcs11", uri, ok=False)

    [line] = result.stderr.splitlines()
    assert line.startswith("device-pki init: pkcs11:token=") and expected in line, line
    assert "not-the-pin" not in line and softhsm.pin not in line
    assert files_under(tmp_path / "pki") == []


def test_a_second_init_on_the_same_token_is_refused(
    softhsm: SoftHSM, token_pki: pki.PKIPaths, tmp_path: Path,  # noqa: F811
) -> None:
    result = device_pki("init", tmp_path / "other", "--pkcs11", softhsm.uri(), ok=False)
    assert "already holds an object labelled 'device-ca'" in result.stderr
    assert files_under(tmp_path / "other") == []


@pytest.mark.parametrize("case", ["wrong-pin", "unknown-object", "other-key"])
def test_a_ca_key_uri_that_does_not_open_is_refused_and_nothing_is_published(
    softhsm: SoftHSM, token_pki: pki.PKIPaths, case: str,  # noqa: F811
) -> None:
    uri_file = token_pki.device_ca / pki.KEY_URI_FILE
    good = uri_file.read_text()
    uri_file.write_text({
        "wrong-pin": softhsm.uri("object=device-ca", pin="s3cret-guess"),
        "unknown-object": softhsm.uri("object=no-such-key"),
        "other-key": softhsm.uri("object=factory-ca"),  # a key, but not the Device CA's
    }[case])
    expected = {"wrong-pin": "refused the PIN", "unknown-object": "no such private key",
                "other-key": "not the CA certificate's key"}[case]
    crl_before = token_pki.crl.read_bytes()

    with pytest.raises(PKIError, match=expected) as caught:
        pki.open_authority(token_pki.device_ca)
    assert "s3cret-guess" not in str(caught.value)
    assert str(caught.value).startswith("pkcs11:token=ca;object=")
    result = device_pki("crl", "--pki", token_pki.base, ok=False)
    [line] = result.stderr.splitlines()
    assert expected in line and "s3cret-guess" not in line
    assert token_pki.crl.read_bytes() == crl_before

    uri_file.write_text(good)
    with pki.open_authority(token_pki.device_ca) as authority:
        assert isinstance(authority.key, hsm.TokenECKey)


def test_uri_parsing_and_redaction() -> None:
    uri = hsm.PKCS11URI.parse(
        "pkcs11:token=My%20CA;object=device-ca;id=%01%02;type=private"
        "?module-path=/usr/lib/x/libsofthsm2.so&pin-value=1234")
    assert (uri.token, uri.object, uri.id, uri.pin()) == ("My CA", "device-ca", b"\x01\x02",
                                                          "1234")
    assert "1234" not in str(uri) and "1234" not in repr(uri)
    assert hsm.PKCS11URI.parse(uri.full()) == uri
    for bad, message in (("file:/x", "not a PKCS#11 URI"),
                         ("pkcs11:token=a;slot-id=1", "'slot-id' is not supported"),
                         ("pkcs11:token=a;type=cert", "type=private"),
                         ("pkcs11:token=a?pin-value=1&pin-source=/p", "not both"),
                         ("pkcs11:token=a;token=b", "given twice")):
        with pytest.raises(PKIError, match=message):
            hsm.PKCS11URI.parse(bad)


@pytest.mark.integration
def test_est_server_with_a_wrong_pin_does_not_start(
    softhsm: SoftHSM, token_pki: pki.PKIPaths, tmp_path: Path,  # noqa: F811
) -> None:
    (token_pki.device_ca / pki.KEY_URI_FILE).write_text(
        softhsm.uri("object=device-ca", pin="s3cret-guess"))

    with pytest.raises(RuntimeError, match="exited with 1") as caught, \
            running_est_server(tmp_path / "est", token_pki):
        pass

    assert "pkcs11:token=ca;object=device-ca" in str(caught.value)
    assert "refused the PIN" in str(caught.value) and "s3cret-guess" not in str(caught.value)
