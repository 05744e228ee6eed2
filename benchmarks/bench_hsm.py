"""EST enrollments per second with the Device CA key in SoftHSM2 against a key file.

    .venv/bin/python benchmarks/bench_hsm.py [--seconds 5] [--clients 1 8] [--sync full]

One run, back to back on the same machine: two PKIs made alike (CA keys as files; CA
keys in a fresh SoftHSM2 token through PKCS#11), the real est-server on each in turn,
the same load as bench_est.py (a new mTLS connection per enrollment), then the raw
certificate-signing rate of each Device CA on one core. Prints both figures and their
ratio (token / file).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _est_process import WORKERS, running_est  # noqa: E402
from bench_est import free_port, measure, prepare, signing_rate  # noqa: E402

from provisioning import pki  # noqa: E402
from simulator.processes import require, require_library  # noqa: E402

PIN = "bench-pin"


def softhsm_token(directory: Path) -> str:
    """A token labelled "bench" in ``directory``; SOFTHSM2_CONF is set for this process and
    the est-server it starts. Returns the token's PKCS#11 URI."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run([require("softhsm2-util"), "--init-token", "--free", "--label", "bench",
                    "--pin", PIN, "--so-pin", "bench-so"], check=True, capture_output=True)
    pin = directory / "pin"
    pin.write_text(PIN + "\n")
    module = require_library("softhsm/libsofthsm2.so")
    return f"pkcs11:token=bench?module-path={module}&pin-source=file:{pin}"


def run_est(directory: Path, paths: pki.PKIPaths, identities: list[tuple[Path, Path, bytes]],
            clients: list[int], seconds: float, sync: str) -> dict[int, tuple[float, int]]:
    port = free_port()
    with running_est(directory, paths, port, sync):
        return {c: measure("enroll", paths, port, identities, c, seconds) for c in clients}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sync", choices=("full", "normal"), default="full",
                        help="the registry's synchronous setting for both servers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hsm-") as tmp:
        directory = Path(tmp)
        uri = softhsm_token(directory / "softhsm")
        setups = {"file": prepare(directory / "file", max(args.clients)),
                  "pkcs11": prepare(directory / "pkcs11", max(args.clients), uri)}
        rates = {name: run_est(directory / name, paths, identities, args.clients,
                               args.seconds, args.sync)
                 for name, (paths, identities) in setups.items()}
        signing = {}
        for name, (paths, _) in setups.items():
            with pki.read_authority(paths.device_ca) as authority:
                signing[name] = signing_rate(authority, args.seconds)

    print(f"machine: {os.cpu_count()} CPUs; EST workers: {WORKERS}; {args.seconds:g} s per "
          f"cell; registry_sync {args.sync}; Device CA EC P-256, key in a file vs in SoftHSM2 "
          "2.6.1 (python-pkcs11, CKM_ECDSA)")
    print(f"{'clients':>8} {'enroll/s (file)':>16} {'enroll/s (pkcs11)':>18} {'ratio':>6} "
          f"{'errors':>7}")
    for c in args.clients:
        (file_rate, file_err), (hsm_rate, hsm_err) = rates["file"][c], rates["pkcs11"][c]
        print(f"{c:>8} {file_rate:>16.0f} {hsm_rate:>18.0f} {hsm_rate / file_rate:>6.0%} "
              f"{file_err + hsm_err:>7}")
    print(f"raw certificate signing, one core: file {signing['file']:.0f}/s, "
          f"pkcs11 {signing['pkcs11']:.0f}/s "
          f"({signing['pkcs11'] / signing['file']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
