"""TLS client contexts whose private key stays in the TPM (tpm2-openssl provider).

Python's ``ssl`` uses the process's default OpenSSL library context, so the
provider is loaded into it once per process, after the ``default`` provider, with
one default property query: ``?tpm2.signature=yes``. It prefers the TPM only for
signature operations. Key exchange, digests, ciphers and randomness stay on the
CPU; so does verifying the server's chain when the server side signs with
Ed25519, which tpm2-openssl does not implement (our PKI does, see
provisioning/pki.py). One handshake then costs the TPM a TPM2_Hash and a
TPM2_Sign and a single transient object, which fits the kernel resource
manager's three. The same query is used for every provider version: 1.1.1
(Debian 12) exports only the public half of a TPM key, so a default-first
query would sign with a key copy that has no private part; 1.2 and later
refuse the export and fall back to the TPM, where the query changes nothing.

A consequence to know: once the provider is active, an EC key held in a
*file* cannot sign a TLS handshake in the same process with tpm2-openssl 1.1.1
(the TPM provider is preferred and cannot use it). Processes that need file
keys (servers, baselines) run without the provider.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import TLSSetupError

TPM_PROPERTY_QUERY = "?tpm2.signature=yes"
TSS2_PEM_MARKER = b"-----BEGIN TSS2 PRIVATE KEY-----"
_OSSL_PARAM_UTF8_PTR = 6


@dataclass(frozen=True)
class ProviderInfo:
    """What was activated in this process, for status output and tests."""

    version: str
    tcti: str
    property_query: str


class _OSSLParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


_lock = threading.Lock()
_active: ProviderInfo | None = None


def _libcrypto() -> ctypes.CDLL:
    """The libcrypto that ``_ssl`` is linked to (already loaded, so dlopen returns it)."""
    lib = ctypes.CDLL("libcrypto.so.3")
    lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
    lib.OSSL_PROVIDER_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.OSSL_PROVIDER_get_params.argtypes = [ctypes.c_void_p, ctypes.POINTER(_OSSLParam)]
    lib.EVP_set_default_properties.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ERR_get_error.restype = ctypes.c_ulong
    lib.ERR_error_string_n.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def _openssl_errors(lib: ctypes.CDLL) -> str:
    messages = []
    while code := lib.ERR_get_error():
        buf = ctypes.create_string_buffer(256)
        lib.ERR_error_string_n(code, buf, len(buf))
        messages.append(buf.value.decode(errors="replace"))
    return "; ".join(messages) or "no OpenSSL error recorded"


def _provider_version(lib: ctypes.CDLL, provider: int) -> str:
    value = ctypes.c_char_p()
    params = (_OSSLParam * 2)()
    params[0] = _OSSLParam(b"version", _OSSL_PARAM_UTF8_PTR,
                           ctypes.cast(ctypes.byref(value), ctypes.c_void_p), 0, 0)
    if not lib.OSSL_PROVIDER_get_params(provider, params) or not value.value:
        return "unknown"
    return value.value.decode()


def enable_tpm_provider(tcti: str) -> ProviderInfo:
    """Make this process's OpenSSL able to use TSS2 key files on ``tcti``.

    Idempotent for the same TCTI. The provider reads its TCTI once, so a second,
    different TCTI in one process is refused rather than silently ignored.
    """
    global _active
    with _lock:
        if _active is not None:
            if _active.tcti != tcti:
                raise TLSSetupError(
                    f"the TPM provider is already bound to {_active.tcti!r} in this process; "
                    f"cannot also use {tcti!r}"
                )
            return _active
        os.environ["TPM2OPENSSL_TCTI"] = tcti
        lib = _libcrypto()
        if not lib.OSSL_PROVIDER_load(None, b"default"):
            raise TLSSetupError(f"cannot load OpenSSL's default provider: {_openssl_errors(lib)}")
        provider = lib.OSSL_PROVIDER_load(None, b"tpm2")
        if not provider:
            raise TLSSetupError(
                "cannot load the tpm2 OpenSSL provider (install Debian's tpm2-openssl): "
                + _openssl_errors(lib)
            )
        if not lib.EVP_set_default_properties(None, TPM_PROPERTY_QUERY.encode()):
            raise TLSSetupError(f"cannot set property query: {_openssl_errors(lib)}")
        _active = ProviderInfo(_provider_version(lib, provider), tcti, TPM_PROPERTY_QUERY)
        return _active


def active_provider() -> ProviderInfo | None:
    return _active


def is_tpm_key_file(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(64).lstrip().startswith(TSS2_PEM_MARKER)
    except OSError as exc:
        raise TLSSetupError(f"cannot read key file {path}: {exc.strerror}") from exc


def client_context(
    *,
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    cafile: str | os.PathLike[str],
    tcti: str | None = None,
) -> ssl.SSLContext:
    """A client context for mutual TLS: TLS 1.2 or newer, server name checked, ``cafile`` only.

    The system trust store is never consulted: a device trusts exactly the
    anchors it was provisioned with. A TSS2 key file needs ``tcti``.
    """
    if is_tpm_key_file(keyfile):
        if tcti is None:
            raise TLSSetupError(f"{keyfile} is a TPM key: a TCTI is needed to use it")
        enable_tpm_provider(tcti)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    try:
        context.load_verify_locations(cafile=os.fspath(cafile))
        context.load_cert_chain(os.fspath(certfile), os.fspath(keyfile))
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(
            f"cannot use certificate {Path(certfile).name} with key {Path(keyfile).name}: {exc}"
        ) from exc
    return context
