"""What durability costs: outbox puts/s and put+ack/s, synchronous=FULL versus NORMAL,
and what the group commit wins back: puts/s of many callers at once through the
committer (one transaction for what arrives while the previous one commits).

The product always runs FULL (the WAL is fsynced at every commit of new
messages, so a message ``put`` returned survives power loss; an acknowledgement
commits without an fsync of its own, the next put's carries it). NORMAL, measured here only for the
comparison, fsyncs at checkpoints: a crash of the process loses nothing, a
power cut can lose the last commits. Both modes run in the same process on
the same file system; pass --dir to measure the device's real storage (tmpfs
makes fsync free and the ratio meaningless).

    .venv/bin/python benchmarks/bench_outbox.py [--seconds 3] [--dir /var/lib/device-agent]
        [--callers 64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_agent.committer import Committer  # noqa: E402
from device_agent.outbox import Outbox  # noqa: E402
from simulator.processes import require  # noqa: E402

SAMPLE = {"load": [0.12, 0.3, 0.25], "mem_available_kb": 812_344, "temperature_c": 48.5}


def rate(box: Outbox, seconds: float, op: Callable[[Outbox], None]) -> float:
    """Operations per second, sequential, for about ``seconds``."""
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        op(box)
        count += 1
    return count / (time.perf_counter() - start)


def put(box: Outbox) -> None:
    box.put("telemetry", SAMPLE)


def put_ack(box: Outbox) -> None:
    box.ack(box.put("telemetry", SAMPLE).seq)


def grouped_rate(box: Outbox, seconds: float, callers: int) -> tuple[float, float]:
    """(puts/s, messages per commit) of ``callers`` threads each putting through one
    committer, every put waiting until durable, as the local API's clients do."""
    counts = [0] * callers
    with Committer(box) as committer:
        start = time.perf_counter()
        deadline = start + seconds

        def caller(k: int) -> None:
            while time.perf_counter() < deadline:
                committer.put("telemetry", SAMPLE)
                counts[k] += 1

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    return sum(counts) / elapsed, sum(counts) / max(committer.commits, 1)


def measure(directory: Path, synchronous: str, seconds: float,
            callers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with Outbox(Path(tmp) / "outbox.db", "bench-device") as box:
            # The product has no switch for this; the benchmark reaches in on purpose.
            box._db.execute(f"PRAGMA synchronous={synchronous}")
            figures = {"put/s": rate(box, seconds, put), "put+ack/s": rate(box, seconds, put_ack)}
            grouped, per_commit = grouped_rate(box, seconds, callers)
            return {**figures, f"put/s, {callers} callers": grouped, "messages/commit": per_commit}


def filesystem(directory: Path) -> str:
    out = subprocess.run([require("df"), "-T", str(directory)], capture_output=True, text=True,
                         check=False).stdout.splitlines()
    return out[-1].split()[1] if len(out) > 1 else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the outbox file lives (default /var/tmp)")
    parser.add_argument("--callers", type=int, default=64,
                        help="threads putting at once through the group commit")
    args = parser.parse_args()
    print(f"outbox in {args.dir} ({filesystem(args.dir)}), {args.seconds:g} s per figure")
    results = {mode: measure(args.dir, mode, args.seconds, args.callers)
               for mode in ("FULL", "NORMAL")}
    print(f"{'':22}{'FULL':>12}{'NORMAL':>12}{'NORMAL/FULL':>14}")
    for metric in results["FULL"]:
        full, normal = results["FULL"][metric], results["NORMAL"][metric]
        print(f"{metric:22}{full:12.0f}{normal:12.0f}{normal / full:13.1f}x")
    full = results["FULL"]
    print(f"group commit, FULL: {args.callers} callers at once store "
          f"{full[f'put/s, {args.callers} callers'] / full['put/s']:.1f}x the puts/s of "
          "one caller, each still answered only once durable")


if __name__ == "__main__":
    main()
