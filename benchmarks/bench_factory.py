"""Time to provision one device on the factory line, swtpm behind tpm2-abrmd.

Prints the median and p95 over N devices for the library call (what a line
controller embedding it pays) and for the `device-provision` command (what an
operator's script pays, Python start-up included), with the share spent in the
TPM (SRK check, key creation, CSR signature) measured separately.

    .venv/bin/python benchmarks/bench_factory.py [--devices 20]

Then bootstrap certificates per second through the factory signing service
(``factory-ca serve``, issue 17) with ``--stations`` concurrent station processes,
each with its own station certificate, beside two baselines from the same run: the
same work in local mode (Factory CA key and registry on the station's filesystem) in
one process, and through the service from one station. The device side uses the file
keystore (``file:`` TCTI) here, so the figure is the service's and the line's, not the
TPM's (a swtpm key and CSR cost is the first table's TPM line).

    .venv/bin/python benchmarks/bench_factory.py --stations 8 --service-devices 400 --skip-tpm
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_agent.tpm import TPM, build_csr  # noqa: E402
from provisioning import pki  # noqa: E402
from provisioning.factory import LineSettings, LocalFactoryCA, provision  # noqa: E402
from provisioning.factory_remote import (  # noqa: E402
    RemoteFactoryCA,
    no_registrar,
    station_context,
)
from provisioning.registry import registrar  # noqa: E402
from simulator.factory_line import Station, running_factory_service  # noqa: E402
from simulator.processes import DBusSession, SoftwareTPM  # noqa: E402


def summary(label: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    return f"{label:<34} median {statistics.median(ordered) * 1000:7.1f} ms   " \
           f"p95 {p95 * 1000:7.1f} ms"


def _line(tmp: Path, paths: pki.PKIPaths) -> LineSettings:
    return LineSettings("https://est.example:8443", "broker.example", 8883,
                        paths.server_trust, state_dir=tmp / "state")


def _station_run(url: str, station: Station, tmp: Path, paths: pki.PKIPaths, devices: int,
                 start: float) -> float:
    """One station process: ``devices`` devices through the service; when it finished."""
    signer = RemoteFactoryCA(url, station_context(station.cert, station.key, station.trust))
    line = _line(tmp, paths)
    while time.time() < start:
        time.sleep(0.001)
    for i in range(devices):
        name = f"{station.name}-{i}"
        keys = tmp / "keys" / name
        keys.mkdir(parents=True)
        provision(name, f"file:{keys}", tmp / "out" / name, signer, line, no_registrar)
    return time.time()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_rates(tmp: Path, stations: int, devices: int) -> None:
    """Certificates per second: local mode, the service from one station, from N."""
    paths = pki.init_pki(tmp / "svc-pki")
    line, signer, register = _line(tmp, paths), LocalFactoryCA(paths), \
        registrar(tmp / "local-registry.sqlite3")
    start = time.perf_counter()
    for i in range(devices):
        (tmp / "keys" / f"local-{i}").mkdir(parents=True)
        provision(f"local-{i}", f"file:{tmp / 'keys' / f'local-{i}'}", tmp / "out" / f"local-{i}",
                  signer, line, register)
    local = devices / (time.perf_counter() - start)
    burst = devices * 2
    with running_factory_service(tmp / "service", paths, rate=1000.0, burst=burst) as service:
        book = [service.add_station(f"st{n}", tmp / "stations" / f"st{n}")
                for n in range(stations)]
        start = time.perf_counter()
        _station_run(service.url, service.add_station("solo", tmp / "stations" / "solo"), tmp,
                     paths, devices, 0)
        solo = devices / (time.perf_counter() - start)
        each = max(1, devices // stations)
        context = multiprocessing.get_context("spawn")
        with context.Pool(stations) as pool:
            begin = time.time() + 3.0  # every process started and imported by then
            cpu = _cpu_seconds(service.process.pid)
            ends = pool.starmap(_station_run, [(service.url, station, tmp, paths, each, begin)
                                               for station in book])
            cpu = _cpu_seconds(service.process.pid) - cpu
        many = each * stations / (max(ends) - begin)
        with service.registry() as registry:
            registered = len(registry.states())
    print(f"bootstrap certificates per second, file keystore on the device side, "
          f"{devices} devices per figure")
    print(f"{'local mode (key + registry on the station), 1 process':<58} {local:7.1f} /s")
    print(f"{'signing service, 1 station':<58} {solo:7.1f} /s")
    print(f"{f'signing service, {stations} stations (processes)':<58} {many:7.1f} /s")
    print(f"the service's own CPU per certificate with {stations} stations: "
          f"{cpu / (each * stations) * 1000:.1f} ms "
          f"(a core to itself: ~{each * stations / cpu:.0f} certificates/s)")
    print(f"devices in the service's registry: {registered} "
          f"(expected {devices + each * stations})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--stations", type=int, default=8)
    parser.add_argument("--service-devices", type=int, default=400)
    parser.add_argument("--skip-tpm", action="store_true",
                        help="only the signing service's figures")
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "all+none")
    with tempfile.TemporaryDirectory(prefix="bench-factory-") as tmp_name:
        service_rates(Path(tmp_name), args.stations, args.service_devices)
    if args.skip_tpm:
        return
    with tempfile.TemporaryDirectory(prefix="bench-factory-") as tmp_name:
        tmp = Path(tmp_name)
        paths = pki.init_pki(tmp / "pki")
        registry = tmp / "registry.sqlite3"
        line = LineSettings("https://est.example:8443", "broker.example", 8883,
                            paths.server_trust, state_dir=tmp / "state")
        signer, register = LocalFactoryCA(paths), registrar(registry)
        with DBusSession(tmp / "dbus") as bus, SoftwareTPM(tmp / "tpm", bus, "bench") as tpm:
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus.address
            tpm_only, library, command = [], [], []
            for i in range(args.devices):
                start = time.perf_counter()
                with TPM(tpm.tcti) as device_tpm:
                    blob = device_tpm.create_key()
                    with device_tpm.loaded(blob) as key:
                        build_csr(key, f"tpm-only-{i}")
                tpm_only.append(time.perf_counter() - start)

                start = time.perf_counter()
                provision(f"lib-{i}", tpm.tcti, tmp / f"lib-{i}", signer, line, register)
                library.append(time.perf_counter() - start)

                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "provisioning.factory_cli", "--pki", str(paths.base),
                     "--registry", str(registry), "--est-url", "https://est.example:8443",
                     "--broker", "broker.example:8883", "--state-dir", str(tmp / "state"),
                     "--device-id", f"cli-{i}", "--tcti", tpm.tcti, "--out", str(tmp / f"cli-{i}")],
                    check=True, capture_output=True)
                command.append(time.perf_counter() - start)
    print(f"provisioning one device, {args.devices} devices, swtpm behind tpm2-abrmd")
    print(summary("TPM work (open, key, CSR)", tpm_only))
    print(summary("provision() library call", library))
    print(summary("device-provision command", command))
    print(f"TPM share of the library call: "
          f"{statistics.median(tpm_only) / statistics.median(library):.0%}")


if __name__ == "__main__":
    main()
