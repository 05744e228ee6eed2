"""TLS client contexts whose private key stays in the TPM (tpm2-openssl provider).

Python's ``ssl`` uses the process's default OpenSSL library context, so the
provider is loaded into it once per process, after the ``default`` provider.
What else is needed depends on the provider's version, detected at load time;
the code path is the same, only the property query differs:

* tpm2-openssl >= 1.2 (Debian 13): no query. OpenSSL first tries the default
  provider, whose attempt to export the TPM key fails, and falls back to the
  key's own provider for the signature. Everything else stays on the CPU and
  keys held in files keep working in the same process.
* tpm2-openssl 1.1.1 (Debian 12) exports only the public half of a TPM key, so
  the default provider would sign with a key that has no private part. The
  query ``?tpm2.signature=yes`` prefers the TPM for signature operations only.
  Verifying the server's chain is a signature operation too, which is why the
  operator's root and server certificates are Ed25519 (provisioning/pki.py):
  tpm2-openssl does not implement it, so it stays on the CPU. The price: a key
  held in a file can no longer sign a handshake in that process.

Either way one TLS 1.3 handshake costs the TPM ECC_Parameters, Hash and Sign
and a single transient object, within the kernel resource manager's three
(measured with the pcap TCTI: tests/test_tls.py, benchmarks/bench_tls.py).
"""

from __future__ import annotations

import ctypes
import gc
import os
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import TLSSetupError, TPMUnreachableError

SIGNATURE_ONLY_QUERY = "?tpm2.signature=yes"
FIXED_EXPORT_VERSION = (1, 2)
TSS2_PEM_MARKER = b"-----BEGIN TSS2 PRIVATE KEY-----"
_OSSL_PARAM_UTF8_PTR = 6


@dataclass(frozen=True)
class ProviderInfo:
    """What was activated in this process, for status output and tests."""

    version: str
    tcti: str
    property_query: str

    @property
    def file_keys_usable(self) -> bool:
        """Whether a key held in a file can still sign handshakes in this process."""
        return not self.property_query


def property_query_for(version: str) -> str:
    """The default property query a provider version needs (see the module docstring)."""
    try:
        parsed = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return SIGNATURE_ONLY_QUERY
    return "" if parsed >= FIXED_EXPORT_VERSION else SIGNATURE_ONLY_QUERY


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

handshake_lock = threading.RLock()
"""Held around everything that makes the provider talk to the TPM: loading a key into a
context, a handshake, and freeing a context. tpm2-openssl keeps one ESYS context per
process and does not lock it; two threads signing at once corrupt each other's
commands (seen as "PEM lib", "unknown algorithm" and handshakes without a certificate
in an agent that renewed while reconnecting)."""


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


def bind_provider_tcti(tcti: str) -> None:
    """Name the provider's TCTI in the environment; call on the main thread before others start.

    Adding an environment variable reallocates the C environment and frees the old
    array under any thread reading it (libfaketime and the TSS2 libraries call
    ``getenv``): an agent segfaulted so at its first TLS connection, about one run in
    twenty-five, when the variable was first set from its enrollment thread.
    """
    os.environ["TPM2OPENSSL_TCTI"] = tcti


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
        if os.environ.get("TPM2OPENSSL_TCTI") != tcti:
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
        version = _provider_version(lib, provider)
        query = property_query_for(version)
        if query and not lib.EVP_set_default_properties(None, query.encode()):
            raise TLSSetupError(f"cannot set property query: {_openssl_errors(lib)}")
        _active = ProviderInfo(version, tcti, query)
        return _active


@contextmanager
def releasing() -> Iterator[None]:
    """Drop references to TLS contexts inside this block: they are freed under the lock.

    A context with a TPM key flushes that key from the TPM when it is freed, and
    Python frees it when the last reference goes, in whichever thread that is.
    The collector runs before the lock is released, for contexts held in cycles.
    """
    with handshake_lock:
        yield
        gc.collect()


def active_provider() -> ProviderInfo | None:
    return _active


def _rand_functions(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.EVP_RAND_fetch.restype = ctypes.c_void_p
    lib.EVP_RAND_fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_RAND_CTX_new.restype = ctypes.c_void_p
    lib.EVP_RAND_CTX_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.EVP_RAND_instantiate.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.EVP_RAND_generate.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                      ctypes.c_uint, ctypes.c_int, ctypes.c_char_p,
                                      ctypes.c_size_t]
    lib.EVP_RAND_CTX_free.argtypes = [ctypes.c_void_p]
    lib.EVP_RAND_free.argtypes = [ctypes.c_void_p]
    return lib


def tpm_answers(tcti: str) -> None:
    """Have the TPM make eight random bytes over the provider's own connection
    (TPM2_GetRandom; tpm2-openssl names its generator CTR-DRBG): the watchdog's proof
    that the TPM answers, without loading a TSS binding into the agent."""
    enable_tpm_provider(tcti)
    lib = _rand_functions(_libcrypto())
    with handshake_lock:
        rand = lib.EVP_RAND_fetch(None, b"CTR-DRBG", b"provider=tpm2")
        if not rand:
            raise TPMUnreachableError(f"the tpm2 provider has no generator: "
                                      f"{_openssl_errors(lib)}")
        context = lib.EVP_RAND_CTX_new(rand, None)
        try:
            out = ctypes.create_string_buffer(8)
            answered = bool(context) and lib.EVP_RAND_instantiate(
                context, 0, 0, None, 0, None) == 1 and lib.EVP_RAND_generate(
                context, out, len(out), 0, 0, None, 0) == 1
        finally:
            if context:
                lib.EVP_RAND_CTX_free(context)
            lib.EVP_RAND_free(rand)
        if not answered:
            raise TPMUnreachableError(f"the TPM does not answer: {_openssl_errors(lib)}")


def is_tpm_key_file(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(64).lstrip().startswith(TSS2_PEM_MARKER)
    except OSError as exc:
        raise TLSSetupError(f"cannot read key file {path}: {exc.strerror}") from exc


NO_CHECK_TIME = 0x200000  # X509_V_FLAG_NO_CHECK_TIME


def client_context(
    *,
    certfile: str | os.PathLike[str] | None,
    keyfile: str | os.PathLike[str] | None,
    cafile: str | os.PathLike[str],
    tcti: str | None = None,
    check_time: bool = True,
) -> ssl.SSLContext:
    """A client context for mutual TLS: TLS 1.2 or newer, server name checked, ``cafile`` only.

    The system trust store is never consulted: a device trusts exactly the
    anchors it was provisioned with. A TSS2 key file needs ``tcti``. Without
    ``check_time`` the chain and name are still verified but not the validity
    dates: for a device whose clock is known to be wrong (lifecycle.py).
    """
    if keyfile is not None and is_tpm_key_file(keyfile):
        if tcti is None:
            raise TLSSetupError(f"{keyfile} is a TPM key: a TCTI is needed to use it")
        enable_tpm_provider(tcti)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if not check_time:
        context.verify_flags |= NO_CHECK_TIME  # type: ignore[assignment]
    try:
        context.load_verify_locations(cafile=os.fspath(cafile))
        if certfile is not None and keyfile is not None:
            with handshake_lock:
                context.load_cert_chain(os.fspath(certfile), os.fspath(keyfile))
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(
            f"cannot use certificate {certfile} with key {keyfile}: {exc}"
        ) from exc
    return context
