"""EST enrollments per second beside two baselines measured in the same run.

    .venv/bin/python benchmarks/bench_est.py [--seconds 3] [--clients 1 8 64]

Every enrollment and every baseline handshake uses a new mTLS connection (a
device enrolls once per connection). Baselines: bare mTLS handshakes against a
plain Python ``ssl`` server with the same TLS context, as many processes as EST
workers, SO_REUSEPORT; and raw ``cryptography`` certificate signing on one core.
``GET cacerts`` on the EST server, a new connection each, is its web and TLS path
without the registry: what is left between it and an enrollment is the registry's.
Clients and servers share this machine's cores, as they would on a test rig.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _est_process import WORKERS, running_est  # noqa: E402

from device_agent._files import write_private  # noqa: E402
from provisioning import pki  # noqa: E402
from provisioning.est_server import server_context  # noqa: E402
from provisioning.registry import open_registry  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the baseline server: accept, handshake, one byte, close -------------------------------


def _baseline_worker(paths: pki.PKIPaths, port: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    context = server_context(paths)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)

    def serve(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"k")
        except (OSError, ssl.SSLError):
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# --- clients ------------------------------------------------------------------------------


def _client_context(paths: pki.PKIPaths, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=paths.server_trust)
    context.load_cert_chain(cert, key)
    return context


def _handshake(context: ssl.SSLContext, port: int, _body: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.recv(1) == b"k"


def _exchange(context: ssl.SSLContext, port: int, request: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(request)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    return reply.startswith(b"HTTP/1.1 200")


def _enroll(context: ssl.SSLContext, port: int, body: bytes) -> bool:
    return _exchange(context, port, (
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/pkcs10\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body))


def _cacerts(context: ssl.SSLContext, port: int, _body: bytes) -> bool:
    """The server's HTTP and TLS path without the registry: where an enrollment's cost
    splits between the web layer and the registry thread."""
    return _exchange(context, port, b"GET /.well-known/est/cacerts HTTP/1.1\r\n"
                                    b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")


def _client_process(kind: str, paths: pki.PKIPaths, port: int,
                    identities: list[tuple[Path, Path, bytes]], seconds: float,
                    results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    call = {"enroll": _enroll, "cacerts": _cacerts, "handshake": _handshake}[kind]
    counts = [0] * len(identities)
    errors = [0] * len(identities)
    start = threading.Barrier(len(identities))

    def loop(i: int, cert: Path, key: Path, body: bytes) -> None:
        context = _client_context(paths, cert, key)
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                ok = call(context, port, body)
            except (OSError, ssl.SSLError):
                ok = False
            counts[i] += ok
            errors[i] += not ok

    threads = [threading.Thread(target=loop, args=(i, *ident))
               for i, ident in enumerate(identities)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((sum(counts), sum(errors)))


def measure(kind: str, paths: pki.PKIPaths, port: int,
            identities: list[tuple[Path, Path, bytes]], clients: int,
            seconds: float) -> tuple[float, int]:
    """Operations per second with ``clients`` concurrent connections, spread over processes."""
    processes = min(clients, 4)
    results: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    shares = [identities[i:clients:processes] for i in range(processes)]
    procs = [multiprocessing.Process(target=_client_process,
                                     args=(kind, paths, port, share, seconds, results))
             for share in shares]
    for proc in procs:
        proc.start()
    totals = [results.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join(30)
    done = sum(t[0] for t in totals)
    return done / seconds, sum(t[1] for t in totals)


def signing_rate(authority: pki.Authority, seconds: float) -> float:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        authority.issue_client("bench-sign", key, dt.timedelta(hours=1))
        count += 1
    return count / seconds


# --- set-up -------------------------------------------------------------------------------


def prepare(directory: Path, clients: int, pkcs11: str | None = None,
            ) -> tuple[pki.PKIPaths, list[tuple[Path, Path, bytes]]]:
    """A PKI (its CA keys in the token ``pkcs11`` names, if given), a registry and
    ``clients`` registered devices with their bootstrap credentials and a CSR each."""
    paths = pki.init_pki(directory / "pki", pkcs11=pkcs11)
    factory = pki.read_authority(paths.factory_ca)
    identities = []
    with open_registry(paths.registry) as registry:
        for i in range(clients):
            device_id = f"bench-{i:03d}"
            key = ec.generate_private_key(ec.SECP256R1())
            cert = factory.issue_client(device_id, key.public_key(), dt.timedelta(days=1))
            registry.register_device(device_id, cert)
            cert_path = write_private(directory / f"{device_id}.pem", pki.cert_pem(cert), 0o644)
            key_path = write_private(directory / f"{device_id}.key", pki.key_pem(key))
            op_key = ec.generate_private_key(ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                               device_id)]))
                   .sign(op_key, hashes.SHA256()))
            body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
            identities.append((cert_path, key_path, body))
    factory.close()
    return paths, identities


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-est-") as tmp:
        directory = Path(tmp)
        paths, identities = prepare(directory, max(args.clients))

        port = free_port()
        baseline = [multiprocessing.Process(target=_baseline_worker, args=(paths, port))
                    for _ in range(WORKERS)]
        for proc in baseline:
            proc.start()
        time.sleep(0.5)
        try:
            handshakes = {c: measure("handshake", paths, port, identities, c, args.seconds)
                          for c in args.clients}
        finally:
            for proc in baseline:
                proc.terminate()
                proc.join(10)

        enrollments = {}
        cacerts: dict[int, tuple[float, int]] = {}
        for sync in ("full", "normal"):
            est_port = free_port()
            with running_est(directory, paths, est_port, sync):
                enrollments[sync] = {c: measure("enroll", paths, est_port, identities, c,
                                                args.seconds) for c in args.clients}
                if sync == "full":
                    cacerts = {c: measure("cacerts", paths, est_port, identities, c,
                                          args.seconds) for c in args.clients}
        signing = signing_rate(pki.read_authority(paths.device_ca), args.seconds)
        with open_registry(paths.registry) as registry:
            recorded = registry.count_certificates()

    print(f"machine: {os.cpu_count()} CPUs; EST workers: {WORKERS}; {args.seconds:.0f} s per "
          "cell; a new mTLS connection (TLS 1.3, client P-256, server Ed25519) per operation")
    print(f"{'clients':>8} {'handshakes/s':>13} {'enroll/s (sync full)':>21} {'ratio':>6} "
          f"{'enroll/s (sync normal)':>23} {'ratio':>6} {'GET cacerts/s':>14} {'ratio':>6} "
          f"{'errors':>7}")
    for c in args.clients:
        hs, hs_err = handshakes[c]
        (full, full_err), (normal, normal_err) = enrollments["full"][c], enrollments["normal"][c]
        web, web_err = cacerts[c]
        print(f"{c:>8} {hs:>13.0f} {full:>21.0f} {full / hs:>6.0%} {normal:>23.0f} "
              f"{normal / hs:>6.0%} {web:>14.0f} {web / hs:>6.0%} "
              f"{hs_err + full_err + normal_err + web_err:>7}")
    print(f"raw cryptography certificate signing (P-256 Device CA, one core): {signing:.0f}/s")
    print(f"registry rows after the run: {recorded} certificates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
