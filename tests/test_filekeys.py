"""The file keystore (SIMULATION ONLY): software keys behind the TPM's surface, and fleet-sim's
scale mode that uses it."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.errors import KeyFileError
from device_agent.filekeys import FileKey, FileKeyStore
from device_agent.keystore import keystore_kind, open_keystore, read_key
from device_agent.tpm import build_csr

FLEET_SIM = str(Path(sys.executable).parent / "fleet-sim")


def test_file_key_is_written_0600_and_signs_a_csr_that_verifies(tmp_path: Path) -> None:
    with open_keystore(f"file:{tmp_path / 'keys'}") as store:
        assert isinstance(store, FileKeyStore)
        store.ping()
        blob = store.create_key()
        path = blob.write(tmp_path / "key.tss")
        with store.loaded(read_key(path, f"file:{tmp_path / 'keys'}")) as key:
            csr = build_csr(key, "sim-001")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert csr.is_signature_valid
    assert csr.public_key() == blob.public_key()
    assert isinstance(blob.public_key(), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("content", [
    b"not a key at all\n",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n",
])
def test_corrupt_or_foreign_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key.tss"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        FileKey.read(path)
    with pytest.raises(KeyFileError):
        read_key(path, "file:/nonexistent")


def test_non_p256_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(KeyFileError, match="P-256"):
        FileKey(other, "p384.pem")


def test_missing_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        read_key(tmp_path / "absent.tss", "file:/x")


def test_the_tcti_selects_the_keystore() -> None:
    assert keystore_kind("file:/var/lib/sim/keys") == "file (simulation)"
    assert keystore_kind("device:/dev/tpmrm0") == "tpm"
    assert keystore_kind("tabrmd:bus_type=session") == "tpm"


@pytest.mark.integration
def test_fleet_sim_file_mode_enrolls_and_runs_devices_without_a_tpm(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [FLEET_SIM, "--keystore", "file", "--devices", "5", "--scenario", "enroll-storm",
         "--json", str(report_path), "--keep"],
        capture_output=True, text=True, timeout=90, check=False,
        env={"TSS2_LOG": "all+none", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    kept = re.search(r"work directory kept: (\S+)", result.stdout)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "file-backed keys (simulation)" in result.stdout
        report = json.loads(report_path.read_text())
        assert report["mode"] == "file"
        assert (report["key_attestation"], report["certificates_attested"]) == ("off", 0)
        assert report["devices"] == report["enrolled"] == report["connected"] == 5
        assert report["messages_lost"] == 0 and report["failures"] == []
        assert report["messages_received"] >= report["messages_sent"] > 0
        assert kept is not None
        device = Path(kept.group(1)) / "devices" / "sim-001"
        assert not (device / "tpm").exists()
        status = json.loads((device / "state" / "status.json").read_text())
        assert status["keystore"] == "file (simulation)"
        assert "SIMULATION ONLY" in (device / "etc" / "agent.log").read_text()
        key = device / "state" / "credentials" / "current" / "key.tss"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        FileKey.read(key)
    finally:
        if kept is not None:
            shutil.rmtree(kept.group(1), ignore_errors=True)
