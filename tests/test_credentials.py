"""Credential generations: staged in full, switched atomically, repaired after a crash."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from device_agent.credentials import CredentialStore
from device_agent.errors import CredentialError
from device_agent.tpm import KeyBlob


@pytest.fixture
def blob(key_file: Path) -> KeyBlob:
    return KeyBlob.read(key_file)


pytestmark = pytest.mark.integration


def test_first_generation_becomes_current_without_previous(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    generation = store.stage(blob, b"cert-1")
    assert store.current() is None
    store.activate(generation)
    assert store.current() == generation
    assert store.previous() is None
    assert stat.S_IMODE(generation.key_path.stat().st_mode) == 0o600


def test_new_generation_keeps_the_previous_until_commit(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1")
    store.activate(first)
    second = store.stage(blob, b"cert-2")
    store.activate(second)
    assert (store.current(), store.previous()) == (second, first)
    store.commit()
    assert store.previous() is None
    assert not first.directory.exists()
    assert store.current() == second


def test_rollback_returns_to_the_previous_and_drops_the_failed(tmp_path: Path,
                                                               blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1")
    store.activate(first)
    second = store.stage(blob, b"cert-2")
    store.activate(second)
    assert store.rollback() == first
    assert store.current() == first and store.previous() is None
    assert not second.directory.exists()


def test_rollback_without_previous_is_refused(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    store.activate(store.stage(blob, b"cert-1"))
    with pytest.raises(CredentialError, match="no previous generation"):
        store.rollback()


def test_repair_removes_a_generation_staged_but_never_activated(tmp_path: Path,
                                                                blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1")
    store.activate(first)
    orphan = store.stage(blob, b"cert-2")  # crash before activate
    assert store.repair() == first
    assert not orphan.directory.exists()


def test_repair_falls_back_when_current_is_incomplete(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1")
    store.activate(first)
    second = store.stage(blob, b"cert-2")
    store.activate(second)
    second.cert_path.unlink()  # e.g. storage lost the file
    assert store.repair() == first
    assert store.previous() is None


def test_repair_clears_a_half_made_link(tmp_path: Path, blob: KeyBlob) -> None:
    store = CredentialStore(tmp_path)
    first = store.stage(blob, b"cert-1")
    store.activate(first)
    os.symlink("gen-000001", store.root / ".current.tmp")
    assert store.repair() == first
    assert not (store.root / ".current.tmp").is_symlink()
