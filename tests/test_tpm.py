"""The device TPM: persistent SRK, non-exportable signing keys, TSS2 key files, refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.tsskey import TSSPrivKey

from device_agent.errors import (
    ForeignKeyError,
    KeyFileError,
    ResourceManagerAbsentError,
    TPMOutOfMemoryError,
    TPMUnreachableError,
)
from device_agent.tpm import SRK_HANDLE, TPM, KeyBlob, build_csr
from simulator.processes import SoftwareTPM

from .tpm_tools import attributes, field, load_and_read, readpublic

pytestmark = pytest.mark.integration


def test_storage_root_key_is_a_persistent_ecc_storage_primary(swtpm: SoftwareTPM) -> None:
    with TPM(swtpm.tcti) as tpm:
        tpm.storage_root_key()
    out = readpublic(swtpm, "-c", hex(SRK_HANDLE))
    assert field(out, "type") == "ecc"
    assert field(out, "curve-id") == "NIST p256"
    assert {"fixedtpm", "fixedparent", "sensitivedataorigin", "userwithauth",
            "restricted", "decrypt"} <= attributes(out)


def test_storage_root_key_is_reused_not_recreated(swtpm: SoftwareTPM) -> None:
    with TPM(swtpm.tcti) as tpm:
        tpm.storage_root_key()
    first = readpublic(swtpm, "-c", hex(SRK_HANDLE))
    with TPM(swtpm.tcti) as tpm:
        tpm.storage_root_key()
    assert readpublic(swtpm, "-c", hex(SRK_HANDLE)) == first


def test_signing_key_attributes_as_the_tpm_reports_them(
    swtpm: SoftwareTPM, key_file: Path, tmp_path: Path
) -> None:
    out = load_and_read(swtpm, key_file, tmp_path)
    assert attributes(out) == {"fixedtpm", "fixedparent", "sensitivedataorigin",
                               "userwithauth", "sign"}
    assert field(out, "type") == "ecc"
    assert field(out, "curve-id") == "NIST p256"


def test_key_file_is_private_and_holds_only_the_tpm_wrapped_blob(key_file: Path) -> None:
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(pem, None)
    tss = TSSPrivKey.from_pem(pem)
    assert tss.parent == SRK_HANDLE
    assert tss.public.publicArea.objectAttributes & 0x2 == 0x2  # fixedTPM: never duplicable


def test_altered_private_blob_is_refused_by_the_tpm(swtpm: SoftwareTPM, key_file: Path) -> None:
    tss = TSSPrivKey.from_pem(key_file.read_bytes())
    private = bytearray(tss.private.marshal())
    private[-1] ^= 0xFF
    from tpm2_pytss.types import TPM2B_PRIVATE

    altered, _ = TPM2B_PRIVATE.unmarshal(bytes(private))
    blob = KeyBlob(TSSPrivKey(altered, tss.public, True, SRK_HANDLE).to_pem(), "altered.tss")
    with TPM(swtpm.tcti) as tpm, pytest.raises(ForeignKeyError), tpm.loaded(blob):
        pass


def test_csr_is_signed_by_the_tpm_key_and_carries_its_public_key(
    swtpm: SoftwareTPM, key_file: Path
) -> None:
    blob = KeyBlob.read(key_file)
    with TPM(swtpm.tcti) as tpm, tpm.loaded(blob) as key:
        csr = build_csr(key, "dev-csr")
    assert csr.is_signature_valid
    assert csr.public_key() == blob.public_key()
    assert csr.subject.rfc4514_string() == "CN=dev-csr"


def test_key_file_from_another_tpm_is_refused(other_swtpm: SoftwareTPM, key_file: Path) -> None:
    with TPM(other_swtpm.tcti) as tpm:
        with pytest.raises(ForeignKeyError, match="not wrapped by this TPM"):
            with tpm.loaded(KeyBlob.read(key_file)):
                pass


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n"
                                     b"-----END TSS2 PRIVATE KEY-----\n"])
def test_corrupt_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.tss"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="not a TSS2 private key"):
        KeyBlob.read(path)


def test_truncated_key_file_is_refused(tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "truncated.tss"
    path.write_bytes(key_file.read_bytes()[:120])
    with pytest.raises(KeyFileError):
        KeyBlob.read(path)


def test_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyBlob.read(tmp_path / "absent.tss")


def test_unreachable_tpm_is_reported(raw_swtpm: SoftwareTPM) -> None:
    raw_swtpm.stop()
    with pytest.raises(TPMUnreachableError, match="no TPM reachable"):
        TPM(raw_swtpm.tcti)


def test_absent_resource_manager_is_reported(dbus: object) -> None:
    with pytest.raises(ResourceManagerAbsentError, match="tpm2-abrmd"):
        TPM("tabrmd:bus_type=session,bus_name=com.example.NoSuchTabrmd")


def test_tpm_that_goes_away_mid_session_is_reported(raw_swtpm: SoftwareTPM) -> None:
    with TPM(raw_swtpm.tcti) as tpm:
        tpm.storage_root_key()
        raw_swtpm.stop()
        with pytest.raises(TPMUnreachableError):
            tpm.create_key()


# swtpm holds three objects, and a persistent parent occupies one while it is used:
# two transient keys fill it for any command under the SRK.
SWTPM_TRANSIENT_ROOM = 2


def _leak_objects(tcti: str, count: int) -> None:
    """Load keys and drop the connection without flushing, as a crashed process would."""
    with TPM(tcti) as tpm:
        blob = tpm.create_key()
        srk = tpm.storage_root_key()
        for _ in range(count):
            tpm.esapi.load(srk, blob.tss_key.private, blob.tss_key.public)


def test_object_memory_exhaustion_is_flushed_and_retried(raw_swtpm: SoftwareTPM) -> None:
    _leak_objects(raw_swtpm.tcti, SWTPM_TRANSIENT_ROOM)
    with TPM(raw_swtpm.tcti) as tpm:
        blob = tpm.create_key()
        with tpm.loaded(blob) as key:
            assert build_csr(key, "dev-pressure").is_signature_valid


def test_object_memory_exhaustion_that_persists_is_named(raw_swtpm: SoftwareTPM) -> None:
    with TPM(raw_swtpm.tcti) as tpm:
        blob = tpm.create_key()
        with tpm.loaded(blob), tpm.loaded(blob):
            with pytest.raises(TPMOutOfMemoryError, match="TPM_RC_OBJECT_MEMORY"):
                with tpm.loaded(blob):
                    pass
