"""mTLS handshakes per second against one Mosquitto: TPM key versus file key, same run.

Each side runs in its own interpreter: the TPM provider's property query is
process-wide (device_agent/tls.py), and the file-key baseline must be plain
OpenSSL. A handshake here is TCP connect + TLS handshake + close, sequential,
which is what a reconnecting device pays. Also prints the TPM commands per
handshake counted with the pcap TCTI.

    .venv/bin/python benchmarks/bench_tls.py [--seconds 5] [--max-transients 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_agent.tls import active_provider, client_context  # noqa: E402
from device_agent.tpm import TPM  # noqa: E402
from provisioning import pki  # noqa: E402
from simulator.stack import Credential, LocalStack  # noqa: E402
from simulator.tpm_trace import count_commands, flush_capture  # noqa: E402


def handshakes(cred: Credential, cafile: Path, port: int, tcti: str | None,
               seconds: float, env: dict[str, str],
               limit: int | None = None) -> tuple[int, float, str]:
    """Sequential handshakes for ``seconds`` or ``limit`` of them; (count, elapsed, version)."""
    os.environ.update(env)
    context = client_context(certfile=cred.cert, keyfile=cred.key, cafile=cafile, tcti=tcti)
    count, version = 0, ""
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds and count != limit:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                 server_hostname="127.0.0.1") as tls:
            version = tls.version() or ""
        count += 1
    flush_capture()
    provider = active_provider()
    return count, elapsed, f"{version} tpm2-openssl {provider.version}" if provider else version


def in_child(*args: object) -> tuple[int, float, str]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(handshakes, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-transients", type=int, default=3,
                        help="tpm2-abrmd per-connection limit (3 = the kernel's; 0 = none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp, \
            LocalStack(Path(tmp), max_transients=args.max_transients or None) as stack:
        with TPM(stack.tpm.tcti) as tpm:
            blob = tpm.create_key()
        key_path = blob.write(Path(tmp) / "device.tss")
        cert = stack.device_ca.issue_client("bench-tpm", blob.public_key(), dt.timedelta(days=1))
        cert_path = Path(tmp) / "device.pem"
        cert_path.write_bytes(pki.cert_pem(cert))
        tpm_cred = Credential(cert_path, key_path)
        file_cred = stack.file_client("bench-file")
        cafile, port = stack.pki.server_trust, stack.broker.port
        env = {"DBUS_SESSION_BUS_ADDRESS": stack.bus.address}

        trace = Path(tmp) / "trace.pcap"
        traced = {**env, "TCTI_PCAP_FILE": str(trace)}
        counts = []
        for limit in (1, 10, 60):  # warm-up: a TPM's first signature may be answered "retry"
            in_child(tpm_cred, cafile, port, f"pcap:{stack.tpm.tcti}", 60.0, traced, limit)
            counts.append(count_commands(trace))
            trace.unlink()
        per_handshake = Counter({k: v / 50 for k, v in (counts[2] - counts[1]).items()})

        tpm_n, tpm_t, tpm_version = in_child(tpm_cred, cafile, port, stack.tpm.tcti,
                                             args.seconds, env)
        file_n, file_t, file_version = in_child(file_cred, cafile, port, None, args.seconds, env)

    tpm_rate, file_rate = tpm_n / tpm_t, file_n / file_t
    limit = args.max_transients or "unlimited"
    print(f"mTLS handshakes/s against Mosquitto on 127.0.0.1 "
          f"(swtpm behind tpm2-abrmd, max transients {limit}), {args.seconds:.0f} s each")
    print(f"{'key':<10} {'handshakes':>10} {'per second':>11}  protocol")
    print(f"{'TPM':<10} {tpm_n:>10} {tpm_rate:>11.1f}  {tpm_version}")
    print(f"{'file':<10} {file_n:>10} {file_rate:>11.1f}  {file_version}")
    print(f"ratio TPM/file: {tpm_rate / file_rate:.2f}")
    commands = ", ".join(f"{name} {count:g}" for name, count in sorted(per_handshake.items()))
    print(f"TPM commands per handshake: {commands} (total {sum(per_handshake.values()):g})")


if __name__ == "__main__":
    main()
