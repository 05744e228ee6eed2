"""The real device-agent against one Mosquitto: boot, memory, renewal, QoS 1 throughput.

Every figure is taken from outside the agent. Delivery is what the independent
TelemetryMonitor (mosquitto_sub with the back-end identity) receives: the
broker forwards a QoS 1 message only after accepting it, so a seq seen there
has been PUBACKed (or is about to be) to the device.

1. Cold start: spawn ``python -m device_agent.cli run`` for a device that already
   holds an operational TPM credential (no EST) until the monitor receives that
   run's first telemetry message. The same state dir is reused across runs, as
   on a device that reboots: each run's first message is the next seq.
2. Steady state at one telemetry message per second: VmRSS and utime+stime of
   the agent process from /proc, averaged after a warm-up, beside a bare paho
   client in the same window: a fresh interpreter with only ``ssl`` and paho,
   holding one mTLS connection (file key) and publishing one QoS 1 message a
   second, sampled the same way after the same warm-up. Twice: the TPM behind tpm2-abrmd
   (the daemon loads GLib and GIO for its D-Bus TCTI), then a TPM of its own on the raw
   swtpm TCTI, no resource manager (what a device on /dev/tpmrm0 loads: one small TCTI).
3. Throughput at QoS 1: N messages written over one local-API connection, then
   over many connections at once (each sends all its lines before reading an
   answer; lines that arrive while the outbox commits share the next
   transaction), until the monitor has all N, against bare paho-mqtt publishing
   N QoS 1 messages with a file key (in a spawned interpreter, see
   device_agent/tls.py) with the same in-flight window, until every PUBACK is
   in; same broker, same run.
4. First boot: a device provisioned by the factory code (bootstrap key and
   certificate, allowlisted in the registry of a running est-server; key
   attestation off), from spawning the agent to the monitor receiving its first
   message: the credential job makes a TPM key, has the TPM sign the CSR and
   enrolls over EST, then the daemon connects with the new key. N runs each of
   three kinds, interleaved so that they share the machine's load: on the TPM;
   on the file keystore (SIMULATION ONLY, the same agent and factory code); on
   the TPM through the pcap TCTI. The TPM's share two ways: the difference of
   the TPM and file-keystore medians (TPM commands, opening the TPM through
   tpm2-abrmd, the daemon's OpenSSL tpm2 provider; the credential job imports
   tpm2-pytss with either keystore), and the sum of the TPM command round trips
   the pcap TCTI timestamps between spawn and the first message (the credential
   job reports no timing of its own). swtpm computes on this CPU: a discrete
   TPM's key generation and signatures are slower, and are not measured here.
5. Renewal: a factory device whose EST certificates live ``--renewal-lifetime``
   seconds, so that it renews at about 2/3 of that. From its spawn until 3 s
   after the broker confirmed the renewed credential, /proc is read every 10 ms:
   the daemon's VmRSS, and VmRSS and VmHWM of each credential job (the daemon's
   children running device_agent.credential_job, found by a /proc scan); the
   daemon's peak while the renewal runs and the job's peak are reported apart,
   beside the daemon's own RSS before the renewal and the bare paho client's.

    .venv/bin/python benchmarks/bench_agent.py [--runs 20] [--steady 60] [--messages 2000]
        [--clients 32] [--first-boots 5] [--renewal-lifetime 30]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho  # noqa: E402

from device_agent.config import AgentConfig, render_toml  # noqa: E402
from device_agent.outbox import Outbox  # noqa: E402
from device_agent.tls import client_context  # noqa: E402
from provisioning.factory import LineSettings, LocalFactoryCA, provision  # noqa: E402
from provisioning.registry import registrar  # noqa: E402
from simulator.device import AgentProcess  # noqa: E402
from simulator.est import ESTServer, running_est_server  # noqa: E402
from simulator.monitor import TelemetryMonitor  # noqa: E402
from simulator.processes import SoftwareTPM  # noqa: E402
from simulator.seed import seed_operational, write_agent_config  # noqa: E402
from simulator.stack import BACKEND_ID, Credential, LocalStack  # noqa: E402
from simulator.tpm_trace import RoundTrip, round_trips  # noqa: E402

SAMPLE = {"load": [0.12, 0.3, 0.25], "mem_available_kb": 812_344, "temperature_c": 48.5}
POLL = 0.001
QUIET = 3600.0  # telemetry interval that keeps the built-in source out of the way
JOB = b"device_agent.credential_job"  # the daemon's short-lived helper: python -m JOB
JOB_NAME = "job-"  # its /proc/PID/comm once it has its work order: job-<work>
CONFIRMED = "confirmed by the broker"  # the agent's log line once a new credential is in use

# The baseline's whole program, run with ``python -c``: nothing but the interpreter, ssl
# and paho (importing this file would load the agent, the simulator and cryptography).
BARE_PAHO_IDLE = """
import json, ssl, sys, threading, time
import paho.mqtt.client as paho

cert, key, cafile, port, client_id = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.minimum_version = ssl.TLSVersion.TLSv1_2
context.load_verify_locations(cafile)
context.load_cert_chain(cert, key)
connected = threading.Event()
client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                     protocol=paho.MQTTv5)
client.tls_set_context(context)
client.on_connect = lambda *_: connected.set()
client.connect("127.0.0.1", int(port), 10)
client.loop_start()
if not connected.wait(10):
    sys.exit("not connected")
print("connected", flush=True)
data = json.loads(sys.argv[6])
seq = 0
while True:  # one QoS 1 message a second, as the agent's telemetry, until SIGTERM
    seq += 1
    envelope = {"device": client_id, "seq": seq, "ts": time.time(), "data": data}
    client.publish(f"devices/{client_id}/telemetry", json.dumps(envelope), qos=1)
    time.sleep(1.0)
"""


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


def device(stack: LocalStack, root: Path, name: str, interval: float,
           tpm: SoftwareTPM | None = None) -> AgentProcess:
    """A device with an operational credential on ``tpm`` (the stack's, behind tpm2-abrmd,
    if not given)."""
    tpm = tpm or stack.tpm
    config = write_agent_config(root / name, name, tpm.tcti, stack.pki,
                                stack.broker.port, telemetry_interval=interval)
    seed_operational(config, tpm.tcti, stack.device_ca)
    return AgentProcess(config, tpm.env)


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


def vm_kb(pid: int, *fields: str) -> tuple[int, ...]:
    """Memory figures of /proc/<pid>/status in kB, read at once; ValueError for a process
    without memory (a zombie), OSError for one that is gone."""
    found = dict(line.split(":", 1) for line in
                 Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Vm"))
    try:
        return tuple(int(found[field].split()[0]) for field in fields)
    except KeyError as exc:
        raise ValueError(f"no {exc} for {pid}") from None


def rss_mb(pid: int) -> float:
    return vm_kb(pid, "VmRSS")[0] / 1024


def resident_by_mapping(pid: int) -> dict[str, float]:
    """MB resident per mapped file (``[anon]`` for anonymous memory, ``[heap]``), from
    /proc/<pid>/smaps: where a process's RSS sits, libraries apart from Python's objects."""
    resident: dict[str, float] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else "[anon]"
        elif fields[0] == "Rss:":
            resident[name] = resident.get(name, 0.0) + int(fields[1]) / 1024
    return resident


@dataclasses.dataclass(frozen=True)
class Steady:
    rss: float  # MB, mean of one sample a second
    rss_max: float
    cpu: float  # % of one core
    received: int  # messages the monitor had from it in the window
    mappings: dict[str, float]  # MB resident per mapping at the window's end


@contextlib.contextmanager
def bare_paho_idle(cred: Credential, cafile: Path, port: int,
                   client_id: str) -> Iterator[subprocess.Popen[str]]:
    """The baseline client running (connected, one QoS 1 message a second); then SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-c", BARE_PAHO_IDLE, str(cred.cert), str(cred.key), str(cafile),
         str(port), client_id, json.dumps(SAMPLE)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "connected":
            raise RuntimeError(f"bare paho client did not connect (exit {process.wait(10)})")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def steady_state(agent: AgentProcess, monitor: TelemetryMonitor, seconds: float,
                 warmup: float, paho_cred: Credential, cafile: Path,
                 port: int) -> tuple[Steady, Steady]:
    """(the agent, the bare paho client), both started together and sampled together, once
    a second, after the agent's first message and ``warmup``."""
    with agent, bare_paho_idle(paho_cred, cafile, port, "bench-paho-idle") as paho_process:
        assert agent.process is not None
        clients = {agent.device_id: agent.process.pid, "bench-paho-idle": paho_process.pid}
        wait_seq(monitor, agent.device_id, 0, 30)
        time.sleep(warmup)
        received = {name: len(monitor.seqs(name)) for name in clients}
        cpu0 = {name: cpu_seconds(pid) for name, pid in clients.items()}
        samples: dict[str, list[float]] = {name: [] for name in clients}
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds - warmup:
            for name, pid in clients.items():
                samples[name].append(rss_mb(pid))
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        figures = [Steady(statistics.mean(samples[name]), max(samples[name]),
                          (cpu_seconds(pid) - cpu0[name]) / elapsed * 100,
                          len(monitor.seqs(name)) - received[name], resident_by_mapping(pid))
                   for name, pid in clients.items()]
    return figures[0], figures[1]


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


def factory_device(stack: LocalStack, est: ESTServer, root: Path, name: str, tcti: str,
                   env: dict[str, str], interval: float = QUIET,
                   run_tcti: str | None = None) -> AgentProcess:
    """A device as it leaves the factory (provisioning/factory.py on ``tcti``: bootstrap key
    and certificate, allowlisted), not enrolled; only speed knobs turned in its agent.toml,
    and the TCTI it runs with replaced by ``run_tcti`` if given (the pcap TCTI)."""
    directory = root / name
    line = LineSettings(est_url=est.base_url, broker_host="127.0.0.1",
                        broker_port=stack.broker.port, server_trust=stack.pki.server_trust,
                        state_dir=directory / "state", api_socket=directory / "api.sock")
    provision(name, tcti, directory / "etc", LocalFactoryCA(stack.pki), line,
              registrar(est.registry_path))
    path = directory / "etc" / "agent.toml"
    config = AgentConfig.load(path)
    path.write_text(render_toml(dataclasses.replace(
        config, device=dataclasses.replace(config.device, tcti=run_tcti or tcti),
        mqtt=dataclasses.replace(config.mqtt, keepalive=10, telemetry_interval=interval),
        renewal=dataclasses.replace(config.renewal, retry_max=4.0))))
    return AgentProcess(path, env)


@dataclasses.dataclass(frozen=True)
class Boot:
    seconds: float  # spawn -> the monitor's first message of the device
    spawned: float  # wall clock at spawn (the pcap TCTI's clock)
    job: Job | None  # the enroll job, its times in seconds after spawn (when watched)


def first_boot(agent: AgentProcess, monitor: TelemetryMonitor, watch: bool = False) -> Boot:
    wall, start = time.time(), time.monotonic()
    with agent:
        assert agent.process is not None
        watching = MemoryWatch(agent.process.pid)
        with watching if watch else contextlib.nullcontext():
            try:
                seconds = wait_seq(monitor, agent.device_id, 0, 60) - start
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n--- agent log ---\n{agent.log_text()[-3000:]}") \
                    from None
    job = next((j for j in watching.jobs.values() if j.work == "enroll"), None)
    if job is not None:
        job = dataclasses.replace(job, first=job.first - start, last=job.last - start)
    return Boot(seconds, wall, job)


@dataclasses.dataclass
class FirstBoots:
    tpm: list[float] = dataclasses.field(default_factory=list)
    file: list[float] = dataclasses.field(default_factory=list)
    traced: list[Boot] = dataclasses.field(default_factory=list)
    trips: list[list[RoundTrip]] = dataclasses.field(default_factory=list)  # per traced run


def first_boots(stack: LocalStack, est: ESTServer, root: Path, monitor: TelemetryMonitor,
                runs: int) -> FirstBoots:
    """``runs`` first boots of each kind, interleaved: TPM, file keystore, TPM traced (and
    its credential job watched in /proc, for the phases)."""
    boots = FirstBoots()
    tcti = stack.tpm.tcti
    for run in range(runs):
        boots.tpm.append(first_boot(factory_device(
            stack, est, root, f"boot-tpm-{run}", tcti, stack.tpm.env), monitor).seconds)
        name = f"boot-file-{run}"
        boots.file.append(first_boot(factory_device(
            stack, est, root, name, f"file:{root / name / 'keys'}", {}), monitor).seconds)
        capture = root / f"boot-traced-{run}.pcap"
        agent = factory_device(stack, est, root, f"boot-traced-{run}", tcti,
                               {**stack.tpm.env, "TCTI_PCAP_FILE": str(capture)},
                               run_tcti=f"pcap:{tcti}")
        boot = first_boot(agent, monitor, watch=True)  # stopped: its captures are complete
        boots.traced.append(boot)
        boots.trips.append([dataclasses.replace(t, sent=t.sent - boot.spawned)
                            for t in round_trips(capture)
                            if 0 <= t.sent - boot.spawned <= boot.seconds])
    return boots


@dataclasses.dataclass
class Job:
    """One credential job as the watch saw it (monotonic times, kB)."""

    work: str
    first: float
    last: float
    rss_kb: int = 0  # the largest VmRSS sampled
    hwm_kb: int = 0  # its VmHWM: the peak, even one that fell between two samples


def job_work(pid: int) -> str:
    """The work a credential job was ordered to do ("" before its order or once gone)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
    return name.removeprefix(JOB_NAME) if name.startswith(JOB_NAME) else ""


class MemoryWatch:
    """A thread reading /proc every ``period`` s: the daemon's VmRSS, and VmRSS and VmHWM of
    each credential job, a child of the daemon running JOB (found by a scan of /proc: this
    kernel has no /proc/<pid>/task/<tid>/children)."""

    def __init__(self, pid: int, period: float = 0.01) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, daemon kB, jobs' kB)
        self.jobs: dict[int, Job] = {}
        self._others: set[int] = set()  # pids known not to be our jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self._find_jobs(now)
            jobs_kb = 0
            for pid, job in self.jobs.items():
                try:
                    rss, hwm = vm_kb(pid, "VmRSS", "VmHWM")
                except (OSError, ValueError):  # ended: gone, or a zombie without memory
                    continue
                job.last, job.rss_kb, job.hwm_kb = now, max(job.rss_kb, rss), max(job.hwm_kb, hwm)
                if not job.work:
                    job.work = job_work(pid)
                jobs_kb += rss
            try:
                self.samples.append((now, vm_kb(self.pid, "VmRSS")[0], jobs_kb))
            except (OSError, ValueError):
                return
            self._stop.wait(self.period)

    def _find_jobs(self, now: float) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self._others or int(name) in self.jobs:
                continue
            pid = int(name)
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if ppid != self.pid:
                self._others.add(pid)
            elif JOB in argv:
                self.jobs[pid] = Job("", now, now)  # its work: from its name, once ordered
            # else forked, not yet exec'd: looked at again at the next sample


@dataclasses.dataclass(frozen=True)
class Renewal:
    daemon_before: float  # MB, median over the 5 s before the renew job started
    daemon_peak: float  # MB, from the job's start to 3 s after the broker confirmed
    daemon_hwm: float  # MB, the daemon's VmHWM over its whole life (first boot included)
    together_peak: float  # MB, daemon + jobs in the same sample
    renew: Job
    enroll: Job | None
    samples: int
    period_ms: float  # achieved, mean


def renewal(agent: AgentProcess, timeout: float) -> Renewal:
    """Run a factory device through its first boot and its first renewal under the watch."""
    with agent:
        assert agent.process is not None
        with MemoryWatch(agent.process.pid) as watch:
            deadline = time.monotonic() + timeout
            while agent.log_text().count(CONFIRMED) < 2:  # enrolled, then renewed
                if time.monotonic() > deadline or not agent.running():
                    raise TimeoutError(f"no renewal confirmed within {timeout:.0f}s\n"
                                       f"--- agent log ---\n{agent.log_text()[-3000:]}")
                time.sleep(0.2)
            end = time.monotonic() + 3.0
            time.sleep(3.0)  # the new credential's link settles
        daemon_hwm = vm_kb(agent.process.pid, "VmHWM")[0] / 1024
    jobs: dict[str, Job] = {}  # the first job of each kind
    for seen in sorted(watch.jobs.values(), key=lambda j: j.first):
        jobs.setdefault(seen.work, seen)
    if "renew" not in jobs:
        raise RuntimeError(f"no renew job seen; jobs: {sorted(jobs)}")
    job = jobs["renew"]
    before = [kb for t, kb, _ in watch.samples if job.first - 5 <= t < job.first]
    during = [(kb, jobs_kb) for t, kb, jobs_kb in watch.samples if job.first <= t <= end]
    times = [t for t, _, _ in watch.samples]
    return Renewal(statistics.median(before) / 1024, max(kb for kb, _ in during) / 1024,
                   daemon_hwm, max(kb + jobs_kb for kb, jobs_kb in during) / 1024, job,
                   jobs.get("enroll"), len(times),
                   (times[-1] - times[0]) / (len(times) - 1) * 1000)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def spread(values: list[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"median {statistics.median(values):.3f} s   min {min(values):.3f} s   "
            f"max {max(values):.3f} s   stdev {deviation:.3f} s")


def report_steady(agent: Steady, paho_client: Steady, window: float, warmup: float) -> None:
    print(f"steady state, one QoS 1 message a second, {window:.0f} s after a {warmup:.0f} s "
          "warm-up, both processes sampled together once a second:")
    for name, figures in (("device-agent daemon", agent),
                          ("bare paho (interpreter, ssl, paho), file key", paho_client)):
        print(f"  {name:<46} RSS {figures.rss:5.1f} MB (max {figures.rss_max:5.1f})   "
              f"CPU {figures.cpu:5.2f} %   {figures.received} messages received")
    print(f"ratio agent/bare paho, steady RSS: {agent.rss / paho_client.rss:.2f} "
          f"(+{agent.rss - paho_client.rss:.1f} MB)")
    extra = {name: mb - paho_client.mappings.get(name, 0.0)
             for name, mb in agent.mappings.items()}
    shown = sorted((item for item in extra.items() if item[1] >= 0.2), key=lambda i: -i[1])
    print("  where the difference sits (daemon - bare paho, MB resident per mapping): "
          + ", ".join(f"{Path(name).name} {mb:+.1f}" for name, mb in shown))


def report_first_boots(boots: FirstBoots) -> None:
    runs, traced = len(boots.tpm), [boot.seconds for boot in boots.traced]
    print(f"first boot, spawn -> monitor receives seq 1 (its first PUBACK); a factory-provisioned "
          f"device (key attestation off) makes its key, signs the CSR and enrolls over EST; "
          f"{runs} runs of each kind, interleaved:")
    print(f"  {'TPM (swtpm behind tpm2-abrmd)':<40} {spread(boots.tpm)}")
    print(f"  {'file keystore (simulation, same code)':<40} {spread(boots.file)}")
    print(f"  {'TPM through the pcap TCTI, job watched':<40} {spread(traced)}")
    tpm, file = statistics.median(boots.tpm), statistics.median(boots.file)
    print(f"TPM share, by difference of medians (TPM - file keystore): {tpm - file:.3f} s = "
          f"{(tpm - file) / tpm * 100:.0f} % of the TPM median (of minimums: "
          f"{min(boots.tpm) - min(boots.file):.3f} s); it holds the TPM commands, opening the "
          "TPM through tpm2-abrmd and the daemon's OpenSSL tpm2 provider (the credential job "
          "imports tpm2-pytss with either keystore)")
    in_tpm = [sum(t.seconds for t in trips) for trips in boots.trips]
    shares = [busy / seconds * 100 for busy, seconds in zip(in_tpm, traced, strict=True)]
    print(f"TPM share, by command round trips (pcap TCTI timestamps, send -> response through "
          f"tpm2-abrmd, spawn to first message): median {statistics.median(in_tpm):.3f} s, "
          f"median share {statistics.median(shares):.0f} % (min {min(shares):.0f}, "
          f"max {max(shares):.0f}) of the traced runs")
    phases = []  # per watched run: job seen, job alive, after it, TPM in it, TPM outside it
    for boot, trips in zip(boots.traced, boots.trips, strict=True):
        if (job := boot.job) is not None:
            inside = sum(t.seconds for t in trips if job.first <= t.sent <= job.last)
            phases.append((job.first, job.last - job.first, boot.seconds - job.last, inside,
                           sum(t.seconds for t in trips) - inside))
    if phases:
        ms = [f"{statistics.median(column) * 1000:.0f} ms" for column in zip(*phases, strict=True)]
        print(f"  traced runs, phases (medians of {len(phases)}): spawn -> enroll job seen "
              f"{ms[0]}; job seen alive {ms[1]}, TPM commands in that window {ms[3]}; "
              f"last seen -> first message {ms[2]}, TPM commands outside the job's window {ms[4]}")
    counts: Counter[str] = Counter()
    times: dict[str, float] = {}
    for trips in boots.trips:
        for trip in trips:
            counts[trip.name] += 1
            times[trip.name] = times.get(trip.name, 0.0) + trip.seconds
    per_boot = ", ".join(f"{name} {counts[name] / runs:g} ({times[name] / runs * 1000:.0f} ms)"
                         for name in sorted(times, key=times.__getitem__, reverse=True))
    print(f"  TPM commands per first boot (mean of the traced runs): {per_boot}")


def report_renewal(renewed: Renewal, lifetime: int, paho_rss: float) -> None:
    job, enroll = renewed.renew, renewed.enroll
    rise = renewed.daemon_peak - renewed.daemon_before
    print(f"renewal, factory device at one message a second, EST certificates of {lifetime} s "
          f"(renewal at ~2/3), /proc read every 10 ms ({renewed.samples} samples, "
          f"{renewed.period_ms:.1f} ms apart on average):")
    print(f"  daemon VmRSS, median over the 5 s before the renew job:      "
          f"{renewed.daemon_before:6.1f} MB")
    print(f"  daemon VmRSS, peak from the job's start to 3 s after the broker confirmed the new "
          f"credential: {renewed.daemon_peak:6.1f} MB (+{rise:.1f})")
    print(f"  credential job 'renew' ({(job.last - job.first) * 1000:.0f} ms seen alive): peak "
          f"VmHWM {job.hwm_kb / 1024:.1f} MB, largest VmRSS sampled {job.rss_kb / 1024:.1f} MB")
    if enroll is not None:
        print(f"  credential job 'enroll' at its first boot "
              f"({(enroll.last - enroll.first) * 1000:.0f} ms seen alive): peak VmHWM "
              f"{enroll.hwm_kb / 1024:.1f} MB")
    print(f"  daemon + job in one sample, peak {renewed.together_peak:.1f} MB; daemon VmHWM over "
          f"its life (first boot included) {renewed.daemon_hwm:.1f} MB; bare paho steady RSS "
          f"(above) {paho_rss:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="cold starts")
    parser.add_argument("--steady", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--messages", type=int, default=2000, help="throughput N")
    parser.add_argument("--clients", type=int, default=32,
                        help="local-API connections at once in the many-clients figure")
    parser.add_argument("--first-boots", type=int, default=5,
                        help="first boots of each kind (TPM, file keystore, TPM traced)")
    parser.add_argument("--renewal-lifetime", type=int, default=30,
                        help="seconds an EST certificate lives (first boots, renewal)")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp, \
            LocalStack(Path(tmp)) as stack, \
            running_est_server(Path(tmp) / "est", stack.pki,
                               certificate_lifetime=f"{args.renewal_lifetime}s") as est:
        root = Path(tmp)
        backend = stack.file_client(BACKEND_ID)
        cafile = stack.pki.server_trust
        with TelemetryMonitor(port=stack.broker.port, cafile=cafile, cert=backend.cert,
                              key=backend.key) as monitor:
            imports = import_time()
            cold = cold_starts(device(stack, root, "bench-cold", QUIET), monitor, args.runs)
            steady, paho_steady = steady_state(
                device(stack, root, "bench-steady", 1.0), monitor, args.steady, args.warmup,
                stack.file_client("bench-paho-idle"), cafile, stack.broker.port)
            with SoftwareTPM(root / "tpm-direct", None, "direct") as direct_tpm:
                direct, paho_direct = steady_state(
                    device(stack, root, "bench-steady-direct", 1.0, direct_tpm), monitor,
                    args.steady, args.warmup, stack.file_client("bench-paho-idle"), cafile,
                    stack.broker.port)
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
            boots = first_boots(stack, est, root, monitor, args.first_boots)
            renewed = renewal(factory_device(stack, est, root, "bench-renew", stack.tpm.tcti,
                                             stack.tpm.env, interval=1.0),
                              timeout=2 * args.renewal_lifetime + 60)

    n = args.messages
    print("device-agent on 127.0.0.1: swtpm behind tpm2-abrmd (max transients 3), "
          "Mosquitto, mTLS, MQTT 5, est-server")
    print(f"cold start, spawn -> monitor receives the run's first telemetry, {args.runs} runs "
          "(same state dir, next seq):")
    print(f"  median {statistics.median(cold):.3f} s   p95 {percentile(cold, 95):.3f} s   "
          f"min {min(cold):.3f} s   max {max(cold):.3f} s   "
          f"(python -c 'import device_agent.agent', start to exit: {imports:.3f} s)")
    report_first_boots(boots)
    print("steady state with the TPM behind tpm2-abrmd (D-Bus: GLib, GIO and the tabrmd TCTI "
          "in the daemon, as on a device without the kernel's resource manager):")
    report_steady(steady, paho_steady, args.steady - args.warmup, args.warmup)
    print("steady state with the TPM on its own TCTI, no resource manager (the daemon alone "
          "uses the TPM, as a device on /dev/tpmrm0 loads only the device TCTI):")
    report_steady(direct, paho_direct, args.steady - args.warmup, args.warmup)
    report_renewal(renewed, args.renewal_lifetime, paho_steady.rss)
    print(f"throughput at QoS 1, {n} messages, in-flight window {inflight}:")
    print(f"  {'path':<46} {'seconds':>8} {'msg/s':>8}")
    print(f"  {'agent: local API -> outbox (all answers)':<46} {stored:>8.2f} {n / stored:>8.0f}")
    print(f"  {'agent: local API -> monitor has all':<46} {agent_t:>8.2f} {n / agent_t:>8.0f}")
    label = f"agent: {args.clients} API clients -> "
    print(f"  {label + 'outbox (all answers)':<46} {stored_many:>8.2f} "
          f"{n / stored_many:>8.0f}")
    print(f"  {label + 'monitor has all':<46} {many_t:>8.2f} {n / many_t:>8.0f}")
    print(f"  {'agent: pre-filled outbox, first -> last seen':<46} {drained:>8.2f} "
          f"{(n - 1) / drained:>8.0f}")
    print(f"  {'bare paho, file key: all PUBACKs':<46} {paho_t:>8.2f} {n / paho_t:>8.0f}")
    print(f"  {'bare paho, file key: monitor has all':<46} {paho_seen:>8.2f} "
          f"{n / paho_seen:>8.0f}")
    paho_rate = n / paho_seen
    print(f"ratio agent/bare paho, delivered msg/s (aim >= 0.5): local API, one client "
          f"{n / agent_t / paho_rate:.3f}, {args.clients} clients {n / many_t / paho_rate:.3f}; "
          f"pre-filled outbox {(n - 1) / drained / paho_rate:.3f}")
    print(f"wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
