"""CA keys in a PKCS#11 token, named by a PKCS#11 URI (RFC 7512).

A token key is a :class:`TokenECKey`: it implements ``cryptography``'s EC private-key
interface (as tpm2-pytss's TPM keys do), so ``CertificateBuilder.sign`` and
``CertificateRevocationListBuilder.sign`` call its :meth:`~TokenECKey.sign`, which hashes
the TBS bytes here and has the token sign the digest (CKM_ECDSA); the raw r||s the token
returns is DER-encoded for X.509. The Device CA and the Factory CA are EC P-256 whether
their keys are files or token objects, so nothing a device verifies changes.

The library is python-pkcs11 (0.10): a typed, Pythonic layer over the C API (sessions as
objects, attribute enums, one exception class per CKR_ code) that ships manylinux wheels,
where PyKCS11 is a thin SWIG mirror of the C calls.

URI attributes understood: ``token``, ``serial`` (the token), ``object``, ``id``, ``type``
(``private`` only) in the path; ``module-path``, ``pin-value``, ``pin-source``
(``file:/abs/path`` or ``/abs/path``) in the query. Anything else is refused rather than
ignored. Every error is a :class:`PKIError` that names the URI without its PIN.

Login state in PKCS#11 belongs to the process and the token, not to a session: a second
``C_Login`` fails and ``C_Logout`` logs every session out. So this module keeps one
logged-in session per (module, token) per process, shared by the keys opened on it and
closed (and the module finalized) when the last of them closes. Sessions are not
fork-safe: a key refuses to sign in a process other than the one that opened it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from .errors import PKIError

SCHEME = "pkcs11:"
PATH_ATTRIBUTES = ("token", "serial", "object", "id", "type")
QUERY_ATTRIBUTES = ("module-path", "pin-value", "pin-source")
# What a CA key made in a token is: never readable, never exportable, kept on the token.
CA_KEY_TEMPLATE_NOTE = "CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true; CKA_EXTRACTABLE false"
_INSTALL_HINT = "PKCS#11 CA keys need python-pkcs11: install tpm-device-identity[server]"


@dataclass(frozen=True)
class PKCS11URI:
    """A parsed ``pkcs11:`` URI; ``str()`` is the URI without its PIN (safe to log)."""

    token: str | None = None
    serial: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None

    @classmethod
    def parse(cls, text: str) -> PKCS11URI:
        text = text.strip()
        if not text.startswith(SCHEME):
            raise PKIError(f"not a PKCS#11 URI (pkcs11:...): {text.split('?')[0]!r}")
        path, _, query = text[len(SCHEME):].partition("?")
        values: dict[str, Any] = {}
        for part, known, separator in ((path, PATH_ATTRIBUTES, ";"),
                                       (query, QUERY_ATTRIBUTES, "&")):
            for item in filter(None, part.split(separator)):
                name, equals, value = item.partition("=")
                if not equals or name not in known:
                    shown = name if name != "pin-value" else "pin-value (in the path)"
                    raise PKIError(f"PKCS#11 URI attribute {shown!r} is not supported "
                                   f"(path: {', '.join(PATH_ATTRIBUTES)}; "
                                   f"query: {', '.join(QUERY_ATTRIBUTES)})")
                key = name.replace("-", "_")
                if key in values:
                    raise PKIError(f"PKCS#11 URI attribute {name!r} is given twice")
                values[key] = unquote_to_bytes(value) if name == "id" else unquote(value)
        uri = cls(**values)
        if uri.type not in (None, "private"):
            raise PKIError(f"{uri}: a CA key is type=private, not type={uri.type}")
        if uri.pin_value is not None and uri.pin_source is not None:
            raise PKIError(f"{uri}: give pin-value or pin-source, not both")
        return uri

    def _text(self, with_pin: bool) -> str:
        path = [f"{name}={_quote(value)}" for name, value in (
            ("token", self.token), ("serial", self.serial), ("object", self.object),
            ("id", self.id), ("type", self.type)) if value is not None]
        query = [f"{name}={_quote(value)}" for name, value in (
            ("module-path", self.module_path), ("pin-source", self.pin_source),
            ("pin-value", self.pin_value if with_pin else None)) if value is not None]
        return SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self._text(with_pin=False)

    def full(self) -> str:
        """The URI with its PIN, for the CA directory's ``ca.key.uri`` (0600)."""
        return self._text(with_pin=True)

    def naming(self, label: str, key_id: bytes) -> PKCS11URI:
        return replace(self, object=label, id=key_id, type="private")

    def pin(self) -> str:
        if self.pin_value is not None:
            return self.pin_value
        if self.pin_source is None:
            raise PKIError(f"{self}: no PIN (add pin-source=file:/path or pin-value=)")
        source = self.pin_source.removeprefix("file://").removeprefix("file:")
        if not source.startswith("/"):
            raise PKIError(f"{self}: pin-source must be an absolute file path")
        try:
            return Path(source).read_text().rstrip("\r\n")
        except OSError as exc:
            raise PKIError(f"{self}: cannot read the PIN from {source}: {exc.strerror}") from exc


def _quote(value: str | bytes) -> str:
    return quote(value, safe="/" if isinstance(value, str) else "")


# --- sessions: one logged-in session per token per process ------------------------------


@dataclass
class _Opened:
    session: Any
    module: Any
    pid: int
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_registry_lock = threading.Lock()
_opened: dict[tuple[str, str | None, str | None], _Opened] = {}
_initialized_in: dict[str, int] = {}  # module path: the process that initialized it


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError as exc:
        raise PKIError(_INSTALL_HINT) from exc
    return pkcs11


@contextlib.contextmanager
def _translated(uri: PKCS11URI, doing: str) -> Iterator[None]:
    """python-pkcs11's exceptions as one PKIError naming the URI (without the PIN)."""
    pkcs11 = _pkcs11()
    errors = pkcs11.exceptions
    try:
        yield
    except (errors.PinIncorrect, errors.PinInvalid, errors.PinLenRange) as exc:
        raise PKIError(f"{uri}: the token refused the PIN ({doing})") from exc
    except errors.PinLocked as exc:
        raise PKIError(f"{uri}: the token's PIN is locked ({doing})") from exc
    except (errors.NoSuchToken, errors.TokenNotPresent, errors.TokenNotRecognised,
            errors.DeviceRemoved, errors.SlotIDInvalid) as exc:
        raise PKIError(f"{uri}: no such token present ({doing})") from exc
    except errors.MultipleTokensReturned as exc:
        raise PKIError(f"{uri}: more than one token matches; add token= or serial=") from exc
    except errors.NoSuchKey as exc:
        raise PKIError(f"{uri}: no such private key in the token ({doing})") from exc
    except errors.MultipleObjectsReturned as exc:
        raise PKIError(f"{uri}: more than one private key matches; add id=") from exc
    except errors.PKCS11Error as exc:
        detail = str(exc) or type(exc).__name__
        raise PKIError(f"{uri}: PKCS#11 error while {doing}: {detail}") from exc


def _module(uri: PKCS11URI) -> Any:
    if uri.module_path is None:
        raise PKIError(f"{uri}: no PKCS#11 module (add module-path=/path/to/module.so)")
    if not Path(uri.module_path).is_file():
        raise PKIError(f"{uri}: PKCS#11 module {uri.module_path} not found")
    pkcs11 = _pkcs11()
    with _translated(uri, "loading the module"):
        module = pkcs11.lib(uri.module_path)
        if module.initialized and _initialized_in.get(uri.module_path) != os.getpid():
            module.reinitialize()  # initialized before a fork: the child starts afresh
        elif not module.initialized:
            module.initialize()
        _initialized_in[uri.module_path] = os.getpid()
        return module


def _finalize_unused(uri: PKCS11URI, module: Any) -> None:
    """C_Finalize once no session of ours uses ``module`` (it closes any other session,
    such as one a failed login left open); the next open reads its configuration again."""
    if not any(o.module is module for o in _opened.values()):
        with _translated(uri, "finalizing the module"):
            module.finalize()


def _acquire(uri: PKCS11URI, pin: str) -> _Opened:
    assert uri.module_path is not None
    key = (uri.module_path, uri.token, uri.serial)
    with _registry_lock:
        opened = _opened.get(key)
        if opened is not None and opened.pid != os.getpid():  # inherited over a fork: unusable
            del _opened[key]
            opened = None
        if opened is None:
            module = _module(uri)
            try:
                with _translated(uri, "opening the token"):
                    serial = uri.serial.encode() if uri.serial is not None else None
                    tokens = list(module.get_tokens(token_label=uri.token,
                                                    token_serial=serial))
                    if not tokens:
                        raise PKIError(f"{uri}: no such token present")
                    if len(tokens) > 1:
                        raise PKIError(f"{uri}: {len(tokens)} tokens match; "
                                       "add token= or serial=")
                    session = tokens[0].open(user_pin=pin, rw=True)
            except PKIError:
                _finalize_unused(uri, module)
                raise
            opened = _opened[key] = _Opened(session, module, os.getpid())
        opened.users += 1
        return opened


def _release(uri: PKCS11URI, opened: _Opened) -> None:
    assert uri.module_path is not None
    with _registry_lock:
        opened.users -= 1
        if opened.users > 0 or opened.pid != os.getpid():
            return
        _opened.pop((uri.module_path, uri.token, uri.serial), None)
        with _translated(uri, "closing the session"):
            opened.session.close()
        _finalize_unused(uri, opened.module)


# --- the key ------------------------------------------------------------------------------


class TokenECKey(ec.EllipticCurvePrivateKey):
    """An EC private key in a token, usable wherever ``cryptography`` signs with one.

    ``close()`` gives up its share of the token session; the key cannot sign after it.
    """

    def __init__(self, uri: PKCS11URI, opened: _Opened, handle: Any,
                 public: ec.EllipticCurvePublicKey) -> None:
        self.uri = uri
        self._opened: _Opened | None = opened
        self._handle = handle
        self._public = public

    def close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            _release(self.uri, opened)

    def __enter__(self) -> TokenECKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("a token EC key signs with ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(bytes(data))
            digest = hasher.finalize()
        opened = self._opened
        if opened is None:
            raise PKIError(f"{self.uri}: the token key was closed")
        if opened.pid != os.getpid():
            raise PKIError(f"{self.uri}: a PKCS#11 session cannot be used across fork(); "
                           "open the CA key in the process that signs")
        mechanism = _pkcs11().Mechanism.ECDSA
        with opened.lock, _translated(self.uri, "signing"):
            raw = self._handle.sign(digest, mechanism=mechanism)
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                          int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError(f"{self.uri}: a CA key in a token only signs")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError(f"{self.uri}: a CA key in a token cannot be exported")

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise TypeError(f"{self.uri}: a CA key in a token cannot be exported")

    def __copy__(self) -> TokenECKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenECKey:
        return self

    def __repr__(self) -> str:
        return f"<TokenECKey {self.uri}>"


def _public_key(uri: PKCS11URI, public: Any) -> ec.EllipticCurvePublicKey:
    from pkcs11.util.ec import encode_ec_public_key
    key = serialization.load_der_public_key(encode_ec_public_key(public))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"{uri}: the token's public key is not an EC key")
    return key


def open_key(text: str, public: ec.EllipticCurvePublicKey) -> TokenECKey:
    """The private key ``text`` names, checked to be the one of ``public`` (the CA
    certificate's key) by signing a test message: a URI naming the wrong key fails here,
    not at the first enrollment."""
    uri = PKCS11URI.parse(text)
    if uri.object is None and uri.id is None:
        raise PKIError(f"{uri}: name the key with object= or id=")
    pkcs11 = _pkcs11()
    opened = _acquire(uri, uri.pin())
    try:
        with opened.lock, _translated(uri, "finding the key"):
            handle = opened.session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY,
                                            label=uri.object, id=uri.id)
            if handle.key_type != pkcs11.KeyType.EC:
                raise PKIError(f"{uri}: the key is {handle.key_type.name}, not EC")
        key = TokenECKey(uri, opened, handle, public)
        probe = b"device-pki: does this token key match its CA certificate?"
        try:
            public.verify(key.sign(probe, ec.ECDSA(hashes.SHA256())), probe,
                          ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise PKIError(f"{uri}: this key is not the CA certificate's key") from exc
    except BaseException:
        _release(uri, opened)
        raise
    return key


def generate_keys(text: str, labels: Sequence[str],
                  curve: str = "secp256r1") -> list[TokenECKey]:
    """New EC key pairs in the token ``text`` names, one per label; :data:`CA_KEY_TEMPLATE_NOTE`.

    Refused, with nothing made, when the URI names an object or a label is taken.
    """
    uri = PKCS11URI.parse(text)
    if uri.object is not None or uri.id is not None:
        raise PKIError(f"{uri}: name the token only; the CA keys are labelled "
                       f"{', '.join(labels)}")
    pkcs11 = _pkcs11()
    from pkcs11.util.ec import encode_named_curve_parameters
    attribute = pkcs11.Attribute
    opened = _acquire(uri, uri.pin())
    keys: list[TokenECKey] = []
    try:
        with opened.lock, _translated(uri, "generating the CA keys"):
            session = opened.session
            for label in labels:
                if list(session.get_objects({attribute.LABEL: label})):
                    raise PKIError(f"{uri}: the token already holds an object labelled "
                                   f"{label!r}; use another token")
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC, {attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
                local=True)
            for label in labels:
                key_id = os.urandom(8)
                public, private = params.generate_keypair(
                    id=key_id, label=label, store=True,
                    public_template={attribute.TOKEN: True, attribute.VERIFY: True},
                    private_template={attribute.TOKEN: True, attribute.PRIVATE: True,
                                      attribute.SENSITIVE: True, attribute.EXTRACTABLE: False,
                                      attribute.SIGN: True, attribute.DERIVE: False,
                                      attribute.DECRYPT: False, attribute.UNWRAP: False})
                named = uri.naming(label, key_id)
                with _registry_lock:
                    opened.users += 1  # each key holds its share of the session
                keys.append(TokenECKey(named, opened, private, _public_key(named, public)))
    except BaseException:
        for key in keys:
            key.close()
        raise
    finally:
        _release(uri, opened)
    return keys
