"""The broker's hashed CRL directory: a new CRL reaches Mosquitto without a reload.

Mosquitto 2.0 re-checks every client's credentials on SIGHUP, offline sessions
too, and refuses them (they have no TLS connection to take the identity from):
a session restored after a restart is thrown away with what was queued for it,
and one that went offline while the broker ran is added to the expiry list a
second time, which later crashes the broker (upstream #2934, #3418; still so in
2.0.21). Every CRL refresh used to reload the broker, so every refresh did that
to every offline device and to a back end that was reconnecting.

OpenSSL consults a ``capath`` directory for CRLs at every certificate check, not
only at start: a file ``<issuer hash>.r<N>`` with the next free N is read by the
next handshake, and of the CRLs it holds for one issuer OpenSSL uses a current
one with the latest thisUpdate. ``crlfile`` stays (it turns CRL checking on and
is what a starting broker reads first). Files are only added while the broker
runs (its lookup continues from the last N it read), and only when they add
something: a broker keeps every CRL it has read until it restarts. A broker that
is not running gets the directory emptied, so it starts from the CRL file alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509

from ._install import Owner, install
from .errors import BrokerConfigError

# The string types OpenSSL folds to a canonical UTF8String (ASN1_MASK_CANON):
# UTF8String, PrintableString, T61String, IA5String, UniversalString, VisibleString, BMPString.
_CANON_TAGS = {0x0C: "utf-8", 0x13: "latin-1", 0x14: "latin-1", 0x16: "latin-1",
               0x1C: "utf-32-be", 0x1A: "latin-1", 0x1E: "utf-16-be"}
_SPACE = " \t\n\v\f\r"


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _length(len(body)) + body


def _items(der: bytes) -> list[tuple[int, bytes, bytes]]:
    """The TLVs in ``der``, each as (tag, body, whole encoding)."""
    out, at = [], 0
    while at < len(der):
        tag, first = der[at], der[at + 1]
        start, size = at + 2, first
        if first & 0x80:
            count = first & 0x7F
            size = int.from_bytes(der[start:start + count], "big")
            start += count
        out.append((tag, der[start:start + size], der[at:start + size]))
        at = start + size
    return out


def _canon_value(tag: int, body: bytes, whole: bytes) -> bytes:
    if tag not in _CANON_TAGS:
        return whole
    text = body.decode(_CANON_TAGS[tag]).encode("utf-8").strip(_SPACE.encode())
    out, index = bytearray(), 0
    while index < len(text):
        char = text[index]
        if char >= 0x80:
            out.append(char)
        elif chr(char) in _SPACE:
            out.append(0x20)
            while index + 1 < len(text) and chr(text[index + 1]) in _SPACE:
                index += 1
        else:
            out += chr(char).lower().encode()
        index += 1
    return _tlv(0x0C, bytes(out))


def issuer_hash(crl_pem: bytes) -> str:
    """OpenSSL's hash of the CRL issuer's canonical name (X509_NAME_hash), the directory's
    lookup key: SHA-1 over the name's RDN sets with every string value folded (UTF-8,
    ASCII lower case, outer blanks dropped, inner runs made one space), first four bytes
    little-endian."""
    try:
        name = x509.load_pem_x509_crl(crl_pem).issuer.public_bytes()
        canon = bytearray()
        for _, rdn, _ in _items(_items(name)[0][1]):
            entries = []
            for _, entry, _ in _items(rdn):
                (_, _, oid), (tag, body, whole) = _items(entry)
                entries.append(_tlv(0x30, oid + _canon_value(tag, body, whole)))
            canon += _tlv(0x31, b"".join(sorted(entries)))
    except (ValueError, IndexError, UnicodeError) as exc:
        raise BrokerConfigError(f"cannot read the CRL's issuer: {exc}") from exc
    digest = hashlib.sha1(canon, usedforsecurity=False).digest()
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def adds_something(latest_pem: bytes, new_pem: bytes, now: dt.datetime) -> bool:
    """Whether a running broker needs ``new_pem`` beside ``latest_pem`` (the last CRL it was
    given): other revoked serials, or the latest past half its lifetime. The broker keeps
    every CRL it reads until it restarts, so an hourly re-issue of a 7-day CRL is added
    every 3.5 days, a revocation at once."""
    latest, new = x509.load_pem_x509_crl(latest_pem), x509.load_pem_x509_crl(new_pem)
    if {r.serial_number for r in latest} != {r.serial_number for r in new}:
        return True
    ends = latest.next_update_utc
    if ends is None:
        return True
    return ends - now < (ends - latest.last_update_utc) / 2


def publish(directory: Path, crl_pem: bytes, owner: Owner | None, mode: int, *,
            empty_first: bool, now: dt.datetime | None = None) -> Path | None:
    """Add ``crl_pem`` as the issuer's next ``.rN`` file, unless it adds nothing to the last
    one (:func:`adds_something`); ``empty_first`` (the broker is not running) removes every
    CRL there before. Returns the file written, None if none was."""
    if empty_first:
        for old in directory.glob("*.r[0-9]*"):
            old.unlink(missing_ok=True)
    prefix = issuer_hash(crl_pem)
    index = 0
    while (directory / f"{prefix}.r{index}").exists():
        index += 1
    if index:
        try:
            needed = adds_something((directory / f"{prefix}.r{index - 1}").read_bytes(),
                                    crl_pem, now or dt.datetime.now(dt.UTC))
        except (OSError, ValueError):  # the last one unreadable: the new one is needed
            needed = True
        if not needed:
            return None
    return install(directory / f"{prefix}.r{index}", crl_pem, owner, mode)
