"""The outbox keeps every message it acknowledged until the broker has it."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from device_agent.errors import OutboxCorruptError, OutboxError, OutboxFullError
from device_agent.outbox import Message, Outbox


def seqs(messages: list[Message]) -> list[int]:
    return [m.seq for m in messages]


def test_envelope_is_compact_json_with_device_seq_ts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        message = box.put("telemetry", {"temp": 21.5, "tags": ["a"]})
    assert message.seq == 1 and message.topic_suffix == "telemetry"
    assert b" " not in message.payload
    body = json.loads(message.payload)
    assert body == {"device": "dev-1", "seq": 1, "ts": message.created,
                    "data": {"temp": 21.5, "tags": ["a"]}}


def test_bytes_are_stored_as_given_and_still_numbered(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        box.put("telemetry", {"n": 1})
        raw = box.put("blob", b"\x00\xffraw")
        assert raw.seq == 2
        assert box.pending()[1] == raw
        assert box.pending()[1].payload == b"\x00\xffraw"


def test_sequence_numbers_survive_reopen_and_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, "dev-1") as box:
        for i in range(3):
            box.put("t", {"i": i})
        for seq in (1, 2, 3):
            box.ack(seq)
        assert box.depth() == 0
    with Outbox(path, "dev-1") as box:
        assert box.last_seq() == 3
        assert box.put("t", {}).seq == 4


def test_ack_removes_and_is_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        for i in range(4):
            box.put("t", {"i": i})
        box.ack(2)
        box.ack(2)
        box.ack(99)
        assert seqs(box.pending()) == [1, 3, 4]
        assert box.depth() == 3
        assert box.ack_many([1, 3, 1]) == 2
        assert seqs(box.pending()) == [4] and box.depth() == 1


def test_pending_is_oldest_first_with_limit_and_after_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        for i in range(10):
            box.put("t", {"i": i})
        box.ack(3)
        assert seqs(box.pending()) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        assert seqs(box.pending(limit=3)) == [1, 2, 4]
        assert seqs(box.pending(limit=3, after_seq=2)) == [4, 5, 6]
        assert box.pending(after_seq=10) == []


def test_drop_oldest_makes_room_counts_and_logs(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "o.db"
    with caplog.at_level(logging.WARNING, logger="device_agent.outbox"):
        with Outbox(path, "dev-1", max_messages=3) as box:
            for i in range(5):
                box.put("t", {"i": i})
            assert seqs(box.pending()) == [3, 4, 5]
            assert box.depth() == 3 and box.dropped() == 2
    assert "seq 1" in caplog.text and "seq 2" in caplog.text
    with Outbox(path, "dev-1", max_messages=2) as box:
        assert box.dropped() == 2
        box.put("t", {})
        assert seqs(box.pending()) == [5, 6]
        assert box.dropped() == 4


def test_drop_newest_refuses_counts_and_logs(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, "dev-1", max_messages=3, drop_policy="newest") as box:
        for i in range(3):
            box.put("t", {"i": i})
        with caplog.at_level(logging.WARNING, logger="device_agent.outbox"):
            with pytest.raises(OutboxFullError) as raised:
                box.put("t", {"i": 3})
        assert raised.value.seq == 4
        assert "seq 4" in caplog.text
        assert seqs(box.pending()) == [1, 2, 3]
        assert box.dropped() == 1
        box.ack(1)
        assert box.put("t", {}).seq == 5
    with Outbox(path, "dev-1", drop_policy="newest") as box:
        assert box.dropped() == 1 and seqs(box.pending()) == [2, 3, 5]


def test_concurrent_puts_get_unique_gapless_seqs(tmp_path: Path) -> None:
    threads, each = 8, 100
    got: list[int] = []
    got_lock = threading.Lock()
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        def worker() -> None:
            mine = [box.put("t", {"w": threading.get_ident()}).seq for _ in range(each)]
            with got_lock:
                got.extend(mine)

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        assert sorted(got) == list(range(1, threads * each + 1))
        assert seqs(box.pending(limit=10_000)) == sorted(got)
        assert box.depth() == threads * each


def test_concurrent_put_and_ack(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        stop = threading.Event()

        def acker() -> None:
            while not stop.is_set() or box.depth():
                for message in box.pending(limit=10):
                    box.ack(message.seq)

        thread = threading.Thread(target=acker)
        thread.start()
        for i in range(300):
            box.put("t", {"i": i})
        stop.set()
        thread.join(30)
        assert box.depth() == 0 and box.last_seq() == 300


CHILD = """
import sys
from pathlib import Path
from device_agent.outbox import Outbox
box = Outbox(Path(sys.argv[1]), "dev-1")
i = 0
while True:
    message = box.put("telemetry", {"i": i, "pad": "x" * 200})
    sys.stdout.write(f"{message.seq}\\n")
    sys.stdout.flush()
    i += 1
"""


def test_nothing_acknowledged_by_put_is_lost_on_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    stored: list[int] = []
    try:
        while len(stored) < 300:
            line = child.stdout.readline()
            assert line, f"child ended early with {child.wait()}"
            stored.append(int(line))
        child.send_signal(signal.SIGKILL)
        stored.extend(int(line) for line in child.stdout.read().split())
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Outbox(path, "dev-1") as box:
        kept = box.pending(limit=1_000_000)
        assert set(stored) <= set(seqs(kept))
        assert seqs(kept) == list(range(1, len(kept) + 1))
        assert all(json.loads(m.payload)["seq"] == m.seq for m in kept)
        assert box.put("t", {}).seq == len(kept) + 1


def test_database_and_wal_are_private(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        with Outbox(path, "dev-1") as box:
            box.put("t", {})
            for name in ("o.db", "o.db-wal", "o.db-shm"):
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="directory .*nowhere.* does not exist"):
        Outbox(tmp_path / "nowhere" / "o.db", "dev-1")


def test_second_owner_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1"):
        with pytest.raises(OutboxError, match="in use"):
            Outbox(tmp_path / "o.db", "dev-1")
    with Outbox(tmp_path / "o.db", "dev-1"):
        pass


def test_garbage_file_is_corrupt_and_quarantine_keeps_bytes(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    (tmp_path / "outbox.db-wal").write_bytes(b"wal evidence")
    with pytest.raises(OutboxCorruptError, match="outbox.db") as raised:
        Outbox(path, "dev-1")
    assert raised.value.path == str(path)
    kept = Outbox.quarantine(path)
    assert kept.name.startswith("outbox.db.corrupt-") and kept.name.endswith("Z")
    assert kept.read_bytes() == garbage
    assert (tmp_path / f"{kept.name}-wal").read_bytes() == b"wal evidence"
    assert not path.exists() and not (tmp_path / "outbox.db-wal").exists()
    with Outbox(path, "dev-1") as box:
        assert box.put("t", {}).seq == 1


def test_truncated_database_is_corrupt_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, "dev-1") as box:
        for i in range(500):
            box.put("t", {"i": i, "pad": "x" * 200})
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OutboxCorruptError, match="corrupt"):
        Outbox(path, "dev-1")
    kept = Outbox.quarantine(path)
    assert kept.read_bytes() == whole[: len(whole) // 2]


def test_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    other = sqlite3.connect(path)
    other.execute("PRAGMA user_version = 42")
    other.close()
    before = path.read_bytes()
    with pytest.raises(OutboxError, match="schema version 42"):
        Outbox(path, "dev-1")
    assert path.read_bytes() == before


def test_quarantine_of_missing_file_is_an_outbox_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="cannot move"):
        Outbox.quarantine(tmp_path / "absent.db")


@pytest.mark.parametrize("data", [{"x": float("nan")}, ["not", "a", "mapping"]])
def test_bad_data_is_refused_without_consuming_a_seq(tmp_path: Path, data: object) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        with pytest.raises((TypeError, ValueError)):
            box.put("t", data)  # type: ignore[arg-type]
        assert box.last_seq() == 0


@pytest.mark.parametrize("suffix", ["", "/abs", "a/+", "a/#"])
def test_bad_topic_suffix_is_refused(tmp_path: Path, suffix: str) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        with pytest.raises(ValueError, match="topic suffix"):
            box.put(suffix, {})


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_messages"):
        Outbox(tmp_path / "o.db", "dev-1", max_messages=0)
    with pytest.raises(ValueError, match="drop_policy"):
        Outbox(tmp_path / "o.db", "dev-1", drop_policy="random")  # type: ignore[arg-type]


def test_closed_outbox_refuses_work(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev-1")
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        box.put("t", {})
    with pytest.raises(OutboxError, match="closed"):
        box.depth()
