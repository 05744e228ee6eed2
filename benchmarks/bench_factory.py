"""Time to provision one device on the factory line, swtpm behind tpm2-abrmd.

Prints the median and p95 over N devices for the library call (what a line
controller embedding it pays) and for the `device-provision` command (what an
operator's script pays, Python start-up included), with the share spent in the
TPM (SRK check, key creation, CSR signature) measured separately.

    .venv/bin/python benchmarks/bench_factory.py [--devices 20]
"""

from __future__ import annotations

import argparse
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
from provisioning.registry import registrar  # noqa: E402
from simulator.processes import DBusSession, SoftwareTPM  # noqa: E402


def summary(label: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    return f"{label:<34} median {statistics.median(ordered) * 1000:7.1f} ms   " \
           f"p95 {p95 * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "all+none")
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
