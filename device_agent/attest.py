"""The TPM's side of key attestation: EK certificate, attestation key, TPM2_Certify.

The endorsement key (EK) and its certificate are the TPM maker's word that this
is a genuine TPM. At the factory the TPM makes an attestation key (AK), a
restricted signing key under the storage root key, and proves it lives beside
the EK by credential activation. Afterwards, for every new key the device
enrolls, the AK certifies it (TPM2_Certify) with qualifying data bound to that
key, and the evidence goes into the CSR (:mod:`device_agent.csr_attestation`).

Per enrollment this costs the TPM two loads, one TPM2_Certify and two flushes;
the EK is needed only at the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_ASYM_SCHEME,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from ._keyfile import KeyFile
from .csr_attestation import TpmCertifyStatement, build_attested_csr, encode_bundle, key_binding
from .errors import KeyFileError, TPMError
from .tpm import SRK_HANDLE, TPM, KeyBlob, _tpm_error, csr_names, p256_template

_T = TypeVar("_T")

# TCG EK Credential Profile 2.x: (template name, certificate NV index), preferred first.
# swtpm 0.7 writes the RSA 2048 (L-1) and the ECC P-384 (H-3) ones.
EK_TYPES = (
    ("EK-ECC256", 0x01C0000A),
    ("EK-HIGH-ECC256", 0x01C00014),
    ("EK-HIGH-ECC384", 0x01C00016),
    ("EK-RSA2048", 0x01C00002),
    ("EK-HIGH-RSA2048", 0x01C00012),
)

AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


def _ak_template() -> TPMT_PUBLIC:
    """ECC P-256, ECDSA with SHA-256: a restricted key needs its scheme fixed."""
    return p256_template(AK_ATTRIBUTES, TPMT_ECC_SCHEME(
        scheme=TPM2_ALG.ECDSA,
        details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))))


@dataclass(frozen=True)
class AttestationKeyBlob(KeyFile):
    """The AK as a TSS2 PRIVATE KEY file: wrapped by this TPM's SRK, useless elsewhere."""

    pem: bytes
    source: str = "<memory>"
    _key: TSSPrivKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            key = TSSPrivKey.from_pem(self.pem)
        except Exception as exc:  # noqa: BLE001 - the parser raises anything from ASN.1 to struct
            raise KeyFileError(f"{self.source} is not a TSS2 private key: {exc}") from exc
        attrs = key.public.publicArea.objectAttributes
        if not (attrs & TPMA_OBJECT.RESTRICTED and attrs & TPMA_OBJECT.SIGN_ENCRYPT) \
                or attrs & TPMA_OBJECT.DECRYPT:
            raise KeyFileError(f"{self.source} is not a restricted signing key")
        if key.parent != SRK_HANDLE:
            raise KeyFileError(f"{self.source} has parent 0x{key.parent:08x}, not the SRK")
        object.__setattr__(self, "_key", key)

    @property
    def public_area(self) -> bytes:
        """The marshalled TPMT_PUBLIC: what the server registers and verifies with."""
        return bytes(self._key.public.publicArea.marshal())

    @property
    def tss_key(self) -> TSSPrivKey:
        return self._key


@dataclass(frozen=True)
class Endorsement:
    """The TPM's EK certificate (DER) and the template that recreates its EK."""

    kind: str
    index: int
    certificate: bytes
    template: TPM2B_PUBLIC = field(repr=False, compare=False)


def _run(action: str, fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except TSS2_Exception as exc:
        raise _tpm_error(exc, action) from exc


def read_endorsement(tpm: TPM, kinds: Sequence[str] | None = None) -> Endorsement:
    """The first EK certificate in NV (of ``kinds``, default all of :data:`EK_TYPES`,
    ECC first); TPMError if the TPM holds none."""
    esapi = tpm.esapi
    with tpm.lock:
        _, data = _run("list NV indices", lambda: esapi.get_capability(
            TPM2_CAP.HANDLES, TPM2_HC.NV_INDEX_FIRST, 256))
        defined = {int(h) for h in data.data.handles}
        reader = NVReadEK(esapi)

        def nv_read(index: int) -> bytes:
            if int(index) not in defined:  # no probing: a missing index is no TPM error
                raise NoSuchIndex(index)
            return bytes(reader(index))

        for kind, index in EK_TYPES:
            if index in defined and (kinds is None or kind in kinds):
                try:
                    cert, template = create_ek_template(kind, nv_read)
                except TSS2_Exception as exc:
                    raise _tpm_error(exc, "read the EK certificate") from exc
                return Endorsement(kind, index, bytes(cert), template)
    raise TPMError("the TPM holds no EK certificate (TCG EK Credential Profile NV indices)")


@contextmanager
def endorsement_key(tpm: TPM, endorsement: Endorsement) -> Iterator[tuple[ESYS_TR, bytes]]:
    """The EK recreated from its template: (handle, marshalled TPMT_PUBLIC); flushed after."""
    with tpm.lock:
        esapi = tpm.esapi
        handle, public, *_ = _run("create the endorsement key", lambda: esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), endorsement.template, ESYS_TR.ENDORSEMENT))
        try:
            yield handle, bytes(public.publicArea.marshal())
        finally:
            _run("flush the endorsement key", lambda: esapi.flush_context(handle))


def endorsement_public(tpm: TPM, endorsement: Endorsement) -> bytes:
    """The EK's public area (marshalled TPMT_PUBLIC), recreated from its template; the
    EK is flushed before this returns."""
    with endorsement_key(tpm, endorsement) as (_, public):
        return public


def create_attestation_key(tpm: TPM) -> AttestationKeyBlob:
    """A new AK, generated in the TPM under the SRK."""
    with tpm.lock:
        srk = tpm.storage_root_key()
        private, public, *_ = _run("create the attestation key", lambda: tpm.esapi.create(
            srk, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_ak_template())))
    return AttestationKeyBlob(TSSPrivKey(private, public, True, SRK_HANDLE).to_pem())


@contextmanager
def _loaded(tpm: TPM, private: object, public: TPM2B_PUBLIC, what: str) -> Iterator[ESYS_TR]:
    srk = tpm.storage_root_key()
    esapi = tpm.esapi
    handle = _run(f"load the {what}", lambda: esapi.load(srk, private, public))
    try:
        yield handle
    finally:
        _run(f"flush the {what}", lambda: esapi.flush_context(handle))


def activate_credential(tpm: TPM, ak: AttestationKeyBlob, endorsement: Endorsement,
                        credential_blob: bytes, secret: bytes) -> bytes:
    """TPM2_ActivateCredential: the credential back, if made for this AK and this TPM's EK."""
    with tpm.lock, endorsement_key(tpm, endorsement) as (ek, ek_public), \
            _loaded(tpm, ak.tss_key.private, ak.tss_key.public, "attestation key") as handle:
        esapi = tpm.esapi
        ek_area, _ = TPMT_PUBLIC.unmarshal(ek_public)
        session = ESYS_TR.PASSWORD
        if not ek_area.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
            # low-range templates: the EK's user role needs PolicySecret(TPM_RH_ENDORSEMENT)
            session = _run("start a policy session", lambda: esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), ek_area.nameAlg))
        try:
            if session != ESYS_TR.PASSWORD:
                _run("satisfy the EK policy", lambda: esapi.policy_secret(
                    ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0))
            credential = _run("activate the credential", lambda: esapi.activate_credential(
                handle, ek, TPM2B_ID_OBJECT(credential=credential_blob),
                TPM2B_ENCRYPTED_SECRET(secret=secret), session1=ESYS_TR.PASSWORD,
                session2=session))
        finally:
            if session != ESYS_TR.PASSWORD:
                _run("flush the policy session", lambda: esapi.flush_context(session))
    return bytes(credential)


def certify(tpm: TPM, ak: AttestationKeyBlob, blob: KeyBlob) -> TpmCertifyStatement:
    """TPM2_Certify of ``blob`` by the AK, qualified by :func:`key_binding` of its key."""
    qualifying = key_binding(blob.public_key())
    key = blob.tss_key
    with tpm.lock, _loaded(tpm, key.private, key.public, "key") as handle, \
            _loaded(tpm, ak.tss_key.private, ak.tss_key.public, "attestation key") as signer:
        attest, signature = _run("certify the key", lambda: tpm.esapi.certify(
            handle, signer, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)))
    return TpmCertifyStatement(bytes(attest), bytes(signature.marshal()),
                               bytes(key.public.publicArea.marshal()))


def attested_csr(tpm: TPM, ak: AttestationKeyBlob, blob: KeyBlob, device_id: str,
                 renewing: x509.Certificate | None = None) -> x509.CertificateSigningRequest:
    """:func:`device_agent.tpm.build_csr`'s request for ``blob``, carrying the AK's
    TPM2_Certify of it in the id-aa-attestation attribute; the TPM signs both."""
    statement = certify(tpm, ak, blob)
    subject, names = csr_names(device_id, renewing)
    with tpm.loaded(blob) as key:
        return build_attested_csr(key, subject, [x509.Extension(names.oid, False, names)],
                                  encode_bundle([statement]))
