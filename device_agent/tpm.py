"""The device's TPM: storage root key, signing keys that never leave it, TSS2 key files.

Designed for a real chip, where CreatePrimary costs tens of milliseconds and a
connection through the kernel's resource manager holds at most three transient
objects: the storage root key is made once and kept persistent, every object we
load is flushed when its ``with`` block ends, and running out of object memory
(TPM_RC_OBJECT_MEMORY) is met by flushing what leaked and retrying once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HC,
    TPM2_PT,
    TPM2_RC,
    TPMA_OBJECT,
)
from tpm2_pytss.cryptography import tpm_ecc_private_key
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ECC_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from ._keyfile import KeyFile
from .errors import (
    ForeignKeyError,
    KeyFileError,
    ResourceManagerAbsentError,
    TPMError,
    TPMOutOfMemoryError,
    TPMUnreachableError,
)
from .identity import device_uri, validate_device_id

DEFAULT_TCTI = "device:/dev/tpmrm0"
TPM2_PT_FIXED_FIRST = int(TPM2_PT.FIXED)
SRK_HANDLE = 0x81000001

_T = TypeVar("_T")

SRK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)
SIGNING_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)


def _srk_template() -> TPMT_PUBLIC:
    """The TCG storage root key template (ECC P-256), zero-filled unique field."""
    template = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=SRK_ATTRIBUTES,
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(
                    algorithm=TPM2_ALG.AES,
                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                ),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        ),
    )
    template.unique.ecc.x = b"\0" * 32
    template.unique.ecc.y = b"\0" * 32
    return template


def p256_template(attributes: int, scheme: TPMT_ECC_SCHEME | None = None) -> TPMT_PUBLIC:
    """An ECC P-256 key with ``attributes``; ``scheme`` None leaves it to each signature."""
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attributes,
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=scheme or TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        ),
    )


def _signing_key_template() -> TPMT_PUBLIC:
    return p256_template(SIGNING_KEY_ATTRIBUTES)


TCTI_LAYER = 0x0A0000


def _base_error(rc: int) -> int:
    """The TPM response code without layer and handle/parameter/session number."""
    return (rc & 0xBF) if rc & 0x80 else rc & 0xFFF


def _tpm_error(exc: TSS2_Exception, action: str) -> TPMError:
    """Translate a TSS2 exception into the project's error for ``action``."""
    rc = int(exc.rc)
    if rc & 0xFF0000 == TCTI_LAYER:
        return TPMUnreachableError(f"TPM connection lost while trying to {action}: {exc}", rc)
    if _base_error(rc) == TPM2_RC.OBJECT_MEMORY:
        return TPMOutOfMemoryError(
            f"TPM out of object memory (TPM_RC_OBJECT_MEMORY) while trying to {action}", rc
        )
    return TPMError(f"TPM refused to {action}: {exc} (rc 0x{rc:x})", rc)


@dataclass(frozen=True)
class KeyBlob(KeyFile):
    """A TPM-wrapped key as stored in a ``TSS2 PRIVATE KEY`` file.

    The private part is encrypted under the storage root key of the TPM that
    made it; the file is useless anywhere else, but stays 0600 all the same.
    """

    pem: bytes
    source: str = "<memory>"
    _key: TSSPrivKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            key = TSSPrivKey.from_pem(self.pem)
        except Exception as exc:  # noqa: BLE001 - the parser raises anything from ASN.1 to struct
            raise KeyFileError(f"{self.source} is not a TSS2 private key: {exc}") from exc
        public = key.public.publicArea
        if public.type != TPM2_ALG.ECC or public.objectAttributes & TPMA_OBJECT.RESTRICTED:
            raise KeyFileError(f"{self.source} is not an unrestricted ECC signing key")
        if not (0x81000000 <= key.parent <= 0x81FFFFFF):
            raise KeyFileError(
                f"{self.source} has parent 0x{key.parent:08x}; only keys under a persistent "
                "storage root key are supported"
            )
        object.__setattr__(self, "_key", key)

    @property
    def parent(self) -> int:
        return int(self._key.parent)

    @property
    def tss_key(self) -> TSSPrivKey:
        return self._key

    @property
    def attributes(self) -> TPMA_OBJECT:
        return TPMA_OBJECT(self._key.public.publicArea.objectAttributes)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public key, decoded from the blob without asking the TPM."""
        point = self._key.public.publicArea.unique.ecc
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big"),
            ec.SECP256R1(),
        )
        return numbers.public_key()


class TPM:
    """An open connection to the device's TPM; use it as a context manager."""

    def __init__(self, tcti: str = DEFAULT_TCTI) -> None:
        self.tcti = tcti
        self.lock = threading.RLock()  # one command at a time, as the TPM itself
        self._live: set[int] = set()
        self._srk: ESYS_TR | None = None
        try:
            self._tcti = TCTILdr.parse(tcti)
        except TSS2_Exception as exc:
            raise _open_error(tcti, exc) from exc
        try:
            self._ectx = ESAPI(self._tcti)
        except TSS2_Exception as exc:
            self._tcti.close()
            raise _open_error(tcti, exc) from exc

    def close(self) -> None:
        with self.lock:  # never under an operation another thread has in flight
            if self._ectx is not None:
                self._ectx.close()
                self._ectx = None
                self._tcti.close()

    def __enter__(self) -> TPM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def esapi(self) -> ESAPI:
        if self._ectx is None:
            raise TPMError("TPM connection is closed")
        return self._ectx

    def _call(self, action: str, fn: Callable[[], _T]) -> _T:
        """Run one TPM operation; on object-memory pressure flush leaks and retry once."""
        with self.lock:
            return self._call_locked(action, fn)

    def _call_locked(self, action: str, fn: Callable[[], _T]) -> _T:
        for attempt in (1, 2):
            try:
                return fn()
            except TSS2_Exception as exc:
                error = _tpm_error(exc, action)
                if isinstance(error, TPMOutOfMemoryError) and attempt == 1:
                    self.flush_stale_objects()
                    continue
                raise error from exc
        raise AssertionError("unreachable")

    def flush_stale_objects(self) -> int:  # called with the lock held
        """Flush transient objects this connection sees and is not using; returns the count.

        Through a resource manager that is only our own leaks; on a raw TCTI it is
        every process's, which is the point: a raw swtpm keeps what crashed
        processes left behind.
        """
        flushed = 0
        try:
            _, data = self.esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
            handles = [int(h) for h in data.data.handles]
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "list transient objects") from exc
        for handle in handles:
            if handle in self._live:
                continue
            try:
                self.esapi.flush_context(self.esapi.tr_from_tpmpublic(handle))
                flushed += 1
            except TSS2_Exception:
                continue  # already gone, or owned by another connection
        return flushed

    def storage_root_key(self) -> ESYS_TR:
        """The persistent SRK at 0x81000001, created and persisted on first use."""
        if self._srk is not None:
            return self._srk
        try:
            handle = self.esapi.tr_from_tpmpublic(SRK_HANDLE)
        except TSS2_Exception as exc:
            if _base_error(int(exc.rc)) != TPM2_RC.HANDLE:
                raise _tpm_error(exc, "read the storage root key") from exc
            handle = self._create_srk()
        public, _, _ = self._call(
            "read the storage root key", lambda: self.esapi.read_public(handle)
        )
        attrs = public.publicArea.objectAttributes
        if not (attrs & TPMA_OBJECT.RESTRICTED and attrs & TPMA_OBJECT.DECRYPT):
            raise TPMError(f"0x{SRK_HANDLE:08x} holds an object that is not a storage key")
        self._srk = handle
        return handle

    def _create_srk(self) -> ESYS_TR:
        esapi = self.esapi
        primary, *_ = self._call(
            "create the storage root key",
            lambda: esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER
            ),
        )
        try:
            return esapi.evict_control(ESYS_TR.OWNER, primary, SRK_HANDLE)
        except TSS2_Exception as exc:
            if _base_error(int(exc.rc)) != TPM2_RC.NV_DEFINED:
                raise _tpm_error(exc, "persist the storage root key") from exc
            return esapi.tr_from_tpmpublic(SRK_HANDLE)  # another process won the race
        finally:
            esapi.flush_context(primary)

    def create_key(self) -> KeyBlob:
        """A new ECC P-256 signing key, generated inside the TPM under the SRK."""
        srk = self.storage_root_key()
        private, public, *_ = self._call(
            "create a signing key",
            lambda: self.esapi.create(
                srk, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_signing_key_template())
            ),
        )
        return KeyBlob(TSSPrivKey(private, public, True, SRK_HANDLE).to_pem())

    def ping(self) -> None:
        """A cheap command that proves the TPM answers (the watchdog's health probe)."""
        self._call("answer a capability query", lambda: self.esapi.get_capability(
            TPM2_CAP.TPM_PROPERTIES, TPM2_PT_FIXED_FIRST, 1))

    @contextmanager
    def loaded(self, blob: KeyBlob) -> Iterator[ec.EllipticCurvePrivateKey]:
        """The key as a ``cryptography`` private key whose signatures the TPM makes.

        The connection is held for the whole block: signatures need the handle.
        """
        with self.lock:
            yield from self._loaded(blob)

    def _loaded(self, blob: KeyBlob) -> Iterator[ec.EllipticCurvePrivateKey]:
        if blob.parent != SRK_HANDLE:
            raise KeyFileError(f"{blob.source} has parent 0x{blob.parent:08x}, not the SRK")
        srk = self.storage_root_key()
        try:
            handle = self._call(
                "load the key",
                lambda: self.esapi.load(srk, blob.tss_key.private, blob.tss_key.public),
            )
        except TPMError as exc:
            if exc.rc is not None and _base_error(exc.rc) in _FOREIGN_KEY_ERRORS:
                raise ForeignKeyError(
                    f"{blob.source} was not wrapped by this TPM's storage root key "
                    "(made on another TPM, or altered)",
                    exc.rc,
                ) from exc
            raise
        self._live.add(int(self.esapi.tr_get_tpm_handle(handle)))
        try:
            yield _TPMSigningKey(self, handle)
        finally:
            self._live.discard(int(self.esapi.tr_get_tpm_handle(handle)))
            try:
                self.esapi.flush_context(handle)
            except TSS2_Exception as exc:
                raise _tpm_error(exc, "flush the key") from exc


_FOREIGN_KEY_ERRORS = {int(TPM2_RC.INTEGRITY), int(TPM2_RC.BINDING), int(TPM2_RC.SIZE)}


class _TPMSigningKey(tpm_ecc_private_key):
    """tpm2-pytss's key with signing errors translated to the project's."""

    def __init__(self, tpm: TPM, handle: ESYS_TR) -> None:
        try:
            super().__init__(tpm.esapi, handle)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "read the key's public area") from exc

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        try:
            return super().sign(data, signature_algorithm)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "sign") from exc


def _open_error(tcti: str, exc: TSS2_Exception) -> TPMError:
    name, _, conf = tcti.partition(":")
    if name == "tabrmd":
        return ResourceManagerAbsentError(
            f"no tpm2-abrmd answers on TCTI {tcti!r}: start tpm2-abrmd or use device:/dev/tpmrm0",
            int(exc.rc),
        )
    if name == "device":
        path = conf or "/dev/tpmrm0"
        if path.endswith("tpmrm0") and not os.path.exists(path) and os.path.exists("/dev/tpm0"):
            return ResourceManagerAbsentError(
                f"{path} is missing but /dev/tpm0 exists: the kernel's resource manager "
                "(Linux >= 4.12) or tpm2-abrmd is required",
                int(exc.rc),
            )
    return TPMUnreachableError(f"no TPM reachable on TCTI {tcti!r}: {exc}", int(exc.rc))


def build_csr(key: ec.EllipticCurvePrivateKey, device_id: str,
              renewing: x509.Certificate | None = None) -> x509.CertificateSigningRequest:
    """A PKCS#10 request naming the device (CN and URI SAN), signed by ``key``.

    With a key from :meth:`TPM.loaded` the signature is made inside the TPM and
    is the proof of possession the CA checks. A renewal copies subject and
    subjectAltName from the certificate being renewed (RFC 7030, 4.2.2).
    """
    subject, names = csr_names(device_id, renewing)
    builder = (x509.CertificateSigningRequestBuilder().subject_name(subject)
               .add_extension(names, critical=False))
    return builder.sign(key, hashes.SHA256())


def csr_names(device_id: str, renewing: x509.Certificate | None = None,
              ) -> tuple[x509.Name, x509.SubjectAlternativeName]:
    """The subject and subjectAltName a request of :func:`build_csr` carries."""
    validate_device_id(device_id)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    names = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))])
    if renewing is not None:
        subject = renewing.subject
        try:
            names = renewing.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            pass
    return subject, names
