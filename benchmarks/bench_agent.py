"""The real device-agent against one Mosquitto: cold start, steady state, QoS 1 throughput.

Every figure is taken from outside the agent. Delivery is what the independent
TelemetryMonitor (mosquitto_sub with the back-end identity) receives: the
broker forwards a QoS 1 message only after accepting it, so a seq seen there
has been PUBACKed (or is about to be) to the device.

1. Cold start: spawn ``python -m device_agent.cli run`` for a device that already
   holds an operational TPM credential (no EST) until the monitor receives that
   run's first telemetry message. The same state dir is reused across runs, as
   on a device that reboots: each run's first message is the next seq.
2. Steady state at one telemetry message per second: VmRSS and utime+stime of
   the agent process from /proc, averaged after a warm-up.
3. Throughput at QoS 1: N messages written over one local-API connection, then
   over many connections at once (each sends all its lines before reading an
   answer; lines that arrive while the outbox commits share the next
   transaction), until the monitor has all N, against bare paho-mqtt publishing
   N QoS 1 messages with a file key (in a spawned interpreter, see
   device_agent/tls.py) with the same in-flight window, until every PUBACK is
   in; same broker, same run.

    .venv/bin/python benchmarks/bench_agent.py [--runs 20] [--steady 60] [--messages 2000]
        [--clients 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho  # noqa: E402

from device_agent.config import AgentConfig  # noqa: E402
from device_agent.outbox import Outbox  # noqa: E402
from device_agent.tls import client_context  # noqa: E402
from simulator.device import AgentProcess  # noqa: E402
from simulator.monitor import TelemetryMonitor  # noqa: E402
from simulator.seed import seed_operational, write_agent_config  # noqa: E402
from simulator.stack import BACKEND_ID, Credential, LocalStack  # noqa: E402

SAMPLE = {"load": [0.12, 0.3, 0.25], "mem_available_kb": 812_344, "temperature_c": 48.5}
POLL = 0.001
QUIET = 3600.0  # telemetry interval that keeps the built-in source out of the way


def wait_seq(monitor: TelemetryMonitor, device: str, above: int, timeout: float) -> float:
    """monotonic() when ``device``'s seq above ``above`` first reached the monitor."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(seq > above for seq in monitor.seqs(device)):
            return time.monotonic()
        time.sleep(POLL)
    raise TimeoutError(f"{device}: no seq above {above} within {timeout}s")


def wait_all(monitor: TelemetryMonitor, device: str, seqs: set[int], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if seqs.issubset(monitor.seqs(device)):
            return time.monotonic()
        time.sleep(POLL)
    missing = len(seqs - set(monitor.seqs(device)))
    raise TimeoutError(f"{device}: {missing} of {len(seqs)} messages missing after {timeout}s")


def device(stack: LocalStack, root: Path, name: str, interval: float) -> AgentProcess:
    config = write_agent_config(root / name, name, stack.tpm.tcti, stack.pki,
                                stack.broker.port, telemetry_interval=interval)
    seed_operational(config, stack.tpm.tcti, stack.device_ca)
    return AgentProcess(config, stack.tpm.env)


def import_time(runs: int = 5) -> float:
    """Median seconds for a fresh interpreter to import the agent and exit."""
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "import device_agent.cli, device_agent.agent"],
                       check=True)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def cold_starts(agent: AgentProcess, monitor: TelemetryMonitor, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        last = max(monitor.seqs(agent.device_id), default=0)
        start = time.monotonic()
        with agent:
            try:
                times.append(wait_seq(monitor, agent.device_id, last, 30) - start)
            except TimeoutError as exc:
                log = agent.log_text()[-3000:]
                raise TimeoutError(f"{exc}\n--- agent log ---\n{log}") from None
    return times


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def steady_state(agent: AgentProcess, monitor: TelemetryMonitor, seconds: float,
                 warmup: float) -> tuple[float, float, float, int]:
    """(mean RSS MB, max RSS MB, CPU %, messages received) after ``warmup``."""
    with agent:
        assert agent.process is not None
        pid = agent.process.pid
        wait_seq(monitor, agent.device_id, 0, 30)
        time.sleep(warmup)
        received, cpu0, t0 = len(monitor.seqs(agent.device_id)), cpu_seconds(pid), time.monotonic()
        samples = []
        while time.monotonic() - t0 < seconds - warmup:
            samples.append(rss_mb(pid))
            time.sleep(1.0)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
        received = len(monitor.seqs(agent.device_id)) - received
    return statistics.mean(samples), max(samples), cpu, received


def via_local_api(agent: AgentProcess, monitor: TelemetryMonitor, n: int,
                  clients: int = 1) -> tuple[float, float]:
    """(seconds until every answer, seconds until the monitor had all n) for n messages
    written by ``clients`` connections at once, each sending all its lines without
    waiting for an answer (the agent answers in order, each once durable)."""
    answers: list[int] = []
    lock = threading.Lock()
    with agent:
        wait_seq(monitor, agent.device_id, 0, 30)  # connected; its first telemetry is through
        assert agent.config.api.socket is not None
        socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(clients)]
        try:
            for sock in socks:
                sock.connect(str(agent.config.api.socket))

            def run(sock: socket.socket, first: int, count: int) -> None:
                lines = b"".join(json.dumps({"topic": "telemetry", "data": {**SAMPLE, "i": i}})
                                 .encode() + b"\n" for i in range(first, first + count))
                writer = threading.Thread(target=sock.sendall, args=(lines,))
                writer.start()
                with sock.makefile("rb") as replies:
                    mine = [json.loads(replies.readline())["seq"] for _ in range(count)]
                writer.join()
                with lock:
                    answers.extend(mine)

            shares = [n // clients + (k < n % clients) for k in range(clients)]
            workers = [threading.Thread(target=run, args=(sock, sum(shares[:k]), shares[k]))
                       for k, sock in enumerate(socks)]
            start = time.monotonic()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(120)
            stored = time.monotonic() - start
        finally:
            for sock in socks:
                sock.close()
        if len(answers) != n:
            raise RuntimeError(f"{len(answers)} of {n} answers")
        delivered = wait_all(monitor, agent.device_id, set(answers), 120) - start
    return stored, delivered


def drain(agent: AgentProcess, monitor: TelemetryMonitor, n: int) -> float:
    """Seconds from the first to the last of n messages already in the outbox at start:
    the link and the acks alone, as after a broker outage."""
    with Outbox(agent.config.paths.state_dir / "outbox.db", agent.device_id) as outbox:
        for i in range(n):
            outbox.put("telemetry", {**SAMPLE, "i": i})
    with agent:
        first = wait_seq(monitor, agent.device_id, 0, 30)
        return wait_all(monitor, agent.device_id, set(range(1, n + 1)), 120) - first


def bare_paho(cred: Credential, cafile: Path, port: int, client_id: str, n: int,
              inflight: int) -> tuple[float, float]:
    """In a fresh interpreter: (monotonic start, seconds until all n PUBACKs)."""
    acked, done, connected = 0, threading.Event(), threading.Event()

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    client.tls_set_context(client_context(certfile=cred.cert, keyfile=cred.key, cafile=cafile))
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.on_connect = lambda *_: connected.set()
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError("bare paho client not connected")
        topic = f"devices/{client_id}/telemetry"
        start = time.monotonic()
        for seq in range(1, n + 1):
            envelope = {"device": client_id, "seq": seq, "ts": time.time(),
                        "data": {**SAMPLE, "i": seq}}
            client.publish(topic, json.dumps(envelope, separators=(",", ":")), qos=1)
        if not done.wait(120):
            raise TimeoutError(f"only {acked} of {n} PUBACKs")
        return start, time.monotonic() - start
    finally:
        client.disconnect()
        client.loop_stop()


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="cold starts")
    parser.add_argument("--steady", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--messages", type=int, default=2000, help="throughput N")
    parser.add_argument("--clients", type=int, default=32,
                        help="local-API connections at once in the many-clients figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp, \
            LocalStack(Path(tmp)) as stack:
        root = Path(tmp)
        backend = stack.file_client(BACKEND_ID)
        cafile = stack.pki.server_trust
        with TelemetryMonitor(port=stack.broker.port, cafile=cafile, cert=backend.cert,
                              key=backend.key) as monitor:
            imports = import_time()
            cold = cold_starts(device(stack, root, "bench-cold", QUIET), monitor, args.runs)
            rss, rss_max, cpu, steady_n = steady_state(
                device(stack, root, "bench-steady", 1.0), monitor, args.steady, args.warmup)
            agent = device(stack, root, "bench-tput", QUIET)
            inflight = AgentConfig.load(agent.config_path).outbox.inflight
            stored, agent_t = via_local_api(agent, monitor, args.messages)
            many = device(stack, root, "bench-many", QUIET)
            stored_many, many_t = via_local_api(many, monitor, args.messages, args.clients)
            drained = drain(device(stack, root, "bench-drain", QUIET), monitor, args.messages)
            paho_cred = stack.file_client("bench-paho")
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                start, paho_t = pool.submit(bare_paho, paho_cred, cafile, stack.broker.port,
                                            "bench-paho", args.messages, inflight).result()
            paho_seen = wait_all(monitor, "bench-paho", set(range(1, args.messages + 1)),
                                 60) - start

    n = args.messages
    print("device-agent on 127.0.0.1: swtpm behind tpm2-abrmd (max transients 3), "
          "Mosquitto, mTLS, MQTT 5")
    print(f"cold start, spawn -> monitor receives the run's first telemetry, {args.runs} runs "
          "(same state dir, next seq):")
    print(f"  median {statistics.median(cold):.3f} s   p95 {percentile(cold, 95):.3f} s   "
          f"min {min(cold):.3f} s   max {max(cold):.3f} s   "
          f"(python -c 'import device_agent.agent', start to exit: {imports:.3f} s)")
    window = args.steady - args.warmup
    print(f"steady state, telemetry every 1 s, {window:.0f} s after a {args.warmup:.0f} s "
          f"warm-up: RSS {rss:.1f} MB (max {rss_max:.1f}), CPU {cpu:.2f} %, "
          f"{steady_n} messages received")
    print(f"throughput at QoS 1, {n} messages, in-flight window {inflight}:")
    print(f"  {'path':<46} {'seconds':>8} {'msg/s':>8}")
    print(f"  {'agent: local API -> outbox (all answers)':<46} {stored:>8.2f} {n / stored:>8.0f}")
    print(f"  {'agent: local API -> monitor has all':<46} {agent_t:>8.2f} {n / agent_t:>8.0f}")
    many = f"agent: {args.clients} API clients -> "
    print(f"  {many + 'outbox (all answers)':<46} {stored_many:>8.2f} "
          f"{n / stored_many:>8.0f}")
    print(f"  {many + 'monitor has all':<46} {many_t:>8.2f} {n / many_t:>8.0f}")
    print(f"  {'agent: pre-filled outbox, first -> last seen':<46} {drained:>8.2f} "
          f"{(n - 1) / drained:>8.0f}")
    print(f"  {'bare paho, file key: all PUBACKs':<46} {paho_t:>8.2f} {n / paho_t:>8.0f}")
    print(f"  {'bare paho, file key: monitor has all':<46} {paho_seen:>8.2f} "
          f"{n / paho_seen:>8.0f}")
    paho_rate = n / paho_seen
    print(f"ratio agent/bare paho, delivered msg/s (aim >= 0.5): local API, one client "
          f"{n / agent_t / paho_rate:.3f}, {args.clients} clients {n / many_t / paho_rate:.3f}; "
          f"pre-filled outbox {(n - 1) / drained / paho_rate:.3f}")


if __name__ == "__main__":
    main()
