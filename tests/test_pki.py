"""The PKI directory: locked CA keys, revocation reasons, and CRLs the broker will accept."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from provisioning import pki
from provisioning.errors import PKIError
from simulator.processes import require

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    return pki.init_pki(tmp_path_factory.mktemp("locked-pki"), passphrase=b"s3cret")


def test_ca_keys_are_private_and_locked_by_the_passphrase(locked: pki.PKIPaths) -> None:
    for ca in (locked.root, locked.device_ca, locked.factory_ca):
        assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in (ca / "ca.key").read_bytes()
    with pytest.raises(PKIError, match="a passphrase is needed"):
        pki.open_authority(locked.device_ca)
    with pytest.raises(PKIError, match="wrong passphrase"):
        pki.open_authority(locked.device_ca, b"guess")
    assert pki.open_authority(locked.device_ca, b"s3cret").name.rfc4514_string() == "CN=Device CA"


@pytest.mark.parametrize(("text", "flag"), [
    ("keyCompromise", x509.ReasonFlags.key_compromise),
    ("key-compromise", x509.ReasonFlags.key_compromise),
    ("SUPERSEDED", x509.ReasonFlags.superseded),
    ("cessation_of_operation", x509.ReasonFlags.cessation_of_operation),
])
def test_revocation_reasons_are_read_in_any_spelling(text: str, flag: x509.ReasonFlags) -> None:
    assert pki.revocation_reason(text) is flag


@pytest.mark.parametrize("text", ["certificateHold", "removeFromCRL", "lost"])
def test_reasons_we_do_not_publish_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown revocation reason"):
        pki.revocation_reason(text)


def test_each_crl_follows_the_previous_one(locked: pki.PKIPaths, tmp_path: Path) -> None:
    ca = pki.open_authority(locked.device_ca, b"s3cret")
    path = tmp_path / "crl.pem"
    first = pki.publish_crl(ca, [pki.Revocation(0x1234, NOW, x509.ReasonFlags.key_compromise)],
                            path)
    second = pki.publish_crl(ca, [], path)
    number = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
              for c in (first, second)]
    assert number == [1, 2]
    assert second.last_update_utc > first.last_update_utc
    assert second.last_update_utc <= dt.datetime.now(dt.UTC)
    assert x509.load_pem_x509_crl(path.read_bytes()) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_openssl_verifies_the_crl_and_reads_the_reason(locked: pki.PKIPaths,
                                                        tmp_path: Path) -> None:
    ca = pki.open_authority(locked.device_ca, b"s3cret")
    path = tmp_path / "crl.pem"
    pki.publish_crl(ca, [pki.Revocation(0xABCDEF, NOW, x509.ReasonFlags.superseded),
                         pki.Revocation(0x42, NOW)], path)
    out = subprocess.run([require("openssl"), "crl", "-in", path, "-CAfile",
                          locked.device_ca / "ca.pem", "-noout", "-text"],
                         capture_output=True, text=True, check=True)
    assert "verify OK" in out.stderr + out.stdout
    assert "ABCDEF" in out.stdout and "Superseded" in out.stdout
    assert out.stdout.count("Serial Number") == 2
