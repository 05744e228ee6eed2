"""Atomic private writes: readers see the old or the new content, never a half."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from device_agent._files import write_private
from device_agent.errors import FileStoreError


def test_written_file_is_0600_with_the_content(tmp_path: Path) -> None:
    path = write_private(tmp_path / "state", b"generation-1")
    assert path.read_bytes() == b"generation-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rewrite_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    write_private(tmp_path / "state", b"one")
    write_private(tmp_path / "state", b"two")
    assert (tmp_path / "state").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_public_mode_is_explicit(tmp_path: Path) -> None:
    path = write_private(tmp_path / "cert.pem", b"cert", 0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failure_keeps_the_previous_content_and_writes_nothing_else(tmp_path: Path) -> None:
    write_private(tmp_path / "state", b"old")
    (tmp_path / "state.d").mkdir()
    with pytest.raises(FileStoreError):
        write_private(tmp_path / "state.d", b"new")  # a directory cannot be replaced by a file
    assert (tmp_path / "state").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "state.d"]


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileStoreError, match="cannot create a file in"):
        write_private(tmp_path / "absent" / "state", b"x")
