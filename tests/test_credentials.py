"""Credential generations: staged in full, switched atomically, repaired after a crash."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from pathlib import Path

import pytest

from device_agent.credentials import KEEP_GENERATIONS, CertificateFacts, CredentialStore
from device_agent.errors import CredentialError
from device_agent.tpm import KeyBlob

T0 = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
FACTS = CertificateFacts(0x1234, T0, T0 + dt.timedelta(days=7), "00" * 32)


@pytest.fixture
def blob(key_file: Path) -> KeyBlob:
    return KeyBlob.read(key_file)


pytestmark = pytest.mark.integration


def test_first_generation_becomes_current_without_previous(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    generation = store.stage(blob, b"cert-1", FACTS)
    assert store.current() is None
    store.activate(generation)
    assert store.current() == generation
    assert store.previous() is None
    assert stat.S_IMODE(generation.key_path.stat().st_mode) == 0o600


def test_new_generation_keeps_the_previous_until_commit(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1", FACTS)
    store.activate(first)
    second = store.stage(blob, b"cert-2", FACTS)
    store.activate(second)
    assert (store.current(), store.previous()) == (second, first)
    store.commit()
    assert store.previous() is None
    assert first.complete()  # no longer the way back, but not deleted
    assert store.current() == second


def test_rollback_returns_to_the_previous_and_keeps_the_failed_aside(tmp_path: Path,
                                                                     blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1", FACTS)
    store.activate(first)
    second = store.stage(blob, b"cert-2", FACTS)
    store.activate(second)
    assert store.rollback() == first
    assert store.current() == first and store.previous() is None
    [kept] = [p for p in store.root.iterdir() if p.name.startswith("failed-gen-000002-")]
    assert (kept / "cert.pem").read_bytes() == b"cert-2"
    assert store.repair() == first  # set aside, never rolled forward to again


def test_rollback_without_previous_is_refused(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    store.activate(store.stage(blob, b"cert-1", FACTS))
    with pytest.raises(CredentialError, match="no previous generation"):
        store.rollback()


def test_repair_rolls_forward_to_a_generation_staged_but_never_activated(
    tmp_path: Path, blob: KeyBlob,
) -> None:
    """Before: deleted, though it held the certificate the EST server issued last."""
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1", FACTS)
    store.activate(first)
    staged = store.stage(blob, b"cert-2", FACTS)  # crash before activate
    assert store.repair() == staged
    assert store.previous() == first  # until the broker confirms the new one


def test_repair_sets_an_incomplete_generation_aside(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1", FACTS)
    store.activate(first)
    half = store.stage(blob, b"cert-2", FACTS)
    half.key_path.unlink()  # crash while staging
    assert store.repair() == first and store.previous() is None
    assert [p.name[:len("incomplete-gen-000002-")] for p in store.root.iterdir()
            if p.name.startswith("incomplete-")] == ["incomplete-gen-000002-"]


def test_generations_are_pruned_only_by_count_and_said_so(
    tmp_path: Path, blob: KeyBlob, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="device_agent.credentials")
    store = CredentialStore(tmp_path)
    for number in range(1, KEEP_GENERATIONS + 4):
        store.activate(store.stage(blob, f"cert-{number}".encode(), FACTS))
        store.commit()
    numbers = sorted(int(p.name[4:]) for p in store.root.glob("gen-*"))
    total = KEEP_GENERATIONS + 3
    assert numbers == list(range(total - KEEP_GENERATIONS, total + 1))
    assert "pruning credential generation 1 " in caplog.text


def test_repair_falls_back_when_current_is_incomplete(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1", FACTS)
    store.activate(first)
    second = store.stage(blob, b"cert-2", FACTS)
    store.activate(second)
    second.cert_path.unlink()  # e.g. storage lost the file
    assert store.repair() == first
    assert store.previous() is None


def test_repair_clears_a_half_made_link(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1", FACTS)
    store.activate(first)
    os.symlink("gen-000001", store.root / ".current.tmp")
    assert store.repair() == first
    assert not (store.root / ".current.tmp").is_symlink()


def test_facts_are_kept_beside_the_certificate_and_derived_for_an_older_generation(
        tmp_path: Path, blob: KeyBlob, device_ca: object) -> None:
    """The daemon reads facts.json instead of parsing X.509; a generation written before
    facts were kept (or with a damaged file) has them derived from its certificate."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from provisioning import pki

    assert isinstance(device_ca, pki.Authority)
    cert = device_ca.issue_client("facts-dev", ec.generate_private_key(ec.SECP256R1())
                                  .public_key(), dt.timedelta(hours=1))
    pem = pki.cert_pem(cert)
    store = CredentialStore(tmp_path)
    generation = store.stage(blob, pem, CertificateFacts.of(pem))
    facts = generation.facts()
    assert (facts.serial, facts.not_before, facts.not_after) == \
        (cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc)
    assert CertificateFacts.from_json(generation.facts_path.read_bytes()) == facts
    for damage in (None, b"{not json", b'{"serial": "zz"}'):
        if damage is None:
            generation.facts_path.unlink()
        else:
            generation.facts_path.write_bytes(damage)
        assert generation.facts() == facts
        assert CertificateFacts.from_json(generation.facts_path.read_bytes()) == facts
