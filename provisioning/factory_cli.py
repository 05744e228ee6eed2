"""``device-provision``: the factory line's command, one device or a CSV batch.

One device prints its JSON summary; a batch prints one JSON line per device
and a closing tally, carries on past failures, and exits non-zero if any failed.
A batch row is device_id,tcti,out_dir[,recovery_url]: a fourth column, where
given and not empty, replaces --recovery-url for that device. What the agent
would refuse in its agent.toml (an --est-url or --recovery-url that is not an
https:// URL with a host, a relative --state-dir) is refused before anything is
written.

With --manufacturer-roots (PEM, one or more TPM makers' root certificates) and
optionally --manufacturer-intermediates, each TPM must prove its maker and hold a
new attestation key beside its EK, and that key must certify the bootstrap key,
before anything is written; the Factory CA then certifies the attestation key too
(attestation.pem; key attestation, see provisioning/factory.py). A TPM that does
not pass is refused like any failure.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import grp
import json
import os
import sys
from pathlib import Path

from cryptography import x509

from device_agent.errors import IdentityError

from . import pki
from .factory import LineSettings, LocalFactoryCA, provision
from .registry import registrar

SERVICE_GROUP = "device-agent"  # created by the device-agent package (sysusers.d)
NO_GROUP_NOTE = (f"device-provision: note: no group {SERVICE_GROUP!r} here (the device-agent "
                 "package creates it); the identity is readable by its owner and group only")


def _service_group(name: str | None) -> int | None:
    """The gid the identity is handed to: --group, else device-agent where it exists."""
    try:
        return grp.getgrnam(name or SERVICE_GROUP).gr_gid
    except KeyError:
        if name is None:
            return None
        raise IdentityError(f"--group {name}: no such group") from None


def _certificates(path: Path | None, option: str) -> tuple[x509.Certificate, ...]:
    if path is None:
        return ()
    try:
        found = tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except OSError as exc:
        raise IdentityError(f"{option} {path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise IdentityError(f"{option} {path}: not PEM certificates: {exc}") from exc
    return found


def _line(args: argparse.Namespace) -> LineSettings:
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise IdentityError(f"--broker must be HOST:PORT, got {args.broker!r}")
    return LineSettings(
        est_url=args.est_url, broker_host=host, broker_port=int(port),
        server_trust=pki.PKIPaths(args.pki).server_trust, state_dir=args.state_dir,
        installed_dir=args.installed_dir, api_socket=args.api_socket,
        service_group=_service_group(args.group), recovery_url=args.recovery_url,
        manufacturer_roots=_certificates(args.manufacturer_roots, "--manufacturer-roots"),
        manufacturer_intermediates=_certificates(args.manufacturer_intermediates,
                                                 "--manufacturer-intermediates"),
    )


def _signer(args: argparse.Namespace) -> LocalFactoryCA:
    passphrase = None
    if args.passphrase_file:
        try:
            passphrase = Path(args.passphrase_file).read_bytes().strip()
        except OSError as exc:
            raise IdentityError(f"cannot read {args.passphrase_file}: {exc.strerror}") from exc
    return LocalFactoryCA(pki.PKIPaths(args.pki), passphrase)


def _batch(args: argparse.Namespace) -> int:
    """Rows of device_id,tcti,out_dir[,recovery_url]; a header row is optional."""
    line, signer, register = _line(args), _signer(args), registrar(args.registry)
    failed = done = 0
    with open(args.batch, newline="", encoding="utf-8") as rows:
        for number, row in enumerate(csv.reader(rows), start=1):
            if not row or row[0].strip().startswith("#") or row[0].strip() == "device_id":
                continue
            if len(row) not in (3, 4):
                print(json.dumps({"row": number, "ok": False,
                                  "error": "expected 3 or 4 columns "
                                           "device_id,tcti,out_dir[,recovery_url] "
                                           "(quote a TCTI that contains commas)"}), flush=True)
                failed += 1
                continue
            device_id, tcti, out_dir, *rest = (cell.strip() for cell in row)
            try:
                row_line = (dataclasses.replace(line, recovery_url=rest[0]) if rest and rest[0]
                            else line)
                summary = provision(device_id, tcti, Path(out_dir), signer, row_line, register,
                                    force=args.force)
            except (IdentityError, OSError) as exc:  # one device must not stop the line
                failed += 1
                print(json.dumps({"row": number, "device_id": device_id, "ok": False,
                                  "error": str(exc)}), flush=True)
                continue
            done += 1
            print(json.dumps({"row": number, "device_id": device_id, "ok": True,
                              "bootstrap_serial": summary.bootstrap_serial}), flush=True)
    print(json.dumps({"provisioned": done, "failed": failed}), flush=True)
    if done and line.service_group is None:
        print(NO_GROUP_NOTE, file=sys.stderr)
    return 1 if failed else 0


def _single(args: argparse.Namespace) -> int:
    if not (args.device_id and args.tcti and args.out):
        raise IdentityError("give --device-id, --tcti and --out, or --batch CSV")
    line = _line(args)
    summary = provision(args.device_id, args.tcti, Path(args.out), _signer(args), line,
                        registrar(args.registry), force=args.force)
    print(summary.to_json())
    if line.service_group is None:
        print(NO_GROUP_NOTE, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device-provision", description=__doc__)
    parser.add_argument("--pki", type=Path, required=True, help="PKI directory (device-pki init)")
    parser.add_argument("--registry", type=Path, required=True, help="registry database")
    parser.add_argument("--passphrase-file", help="passphrase of the Factory CA key")
    parser.add_argument("--est-url", required=True, help="https://host:port of the EST server")
    parser.add_argument("--recovery-url",
                        help="https://host:port of the EST server's recovery listener, where "
                        "a device whose certificate expired gets a new one (default: none; "
                        "such a device re-enrolls with its bootstrap certificate)")
    parser.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/device-agent"))
    parser.add_argument("--installed-dir", type=Path,
                        help="where the output directory will live on the device")
    parser.add_argument("--api-socket", type=Path, default=LineSettings.api_socket,
                        help="the agent's local API socket (default: %(default)s, in the "
                        "unit's RuntimeDirectory)")
    parser.add_argument("--device-id")
    parser.add_argument("--tcti", help="e.g. device:/dev/tpmrm0")
    parser.add_argument("--out", help="the device's configuration directory")
    parser.add_argument("--batch", type=Path,
                        help="CSV of device_id,tcti,out_dir[,recovery_url]; a recovery_url "
                        "there replaces --recovery-url for that row")
    parser.add_argument("--group", help=f"group the installed agent runs as, given read access "
                        f"to the identity (default: {SERVICE_GROUP}, where that group exists)")
    parser.add_argument("--manufacturer-roots", type=Path, metavar="PEM",
                        help="root certificates of the TPM makers this line accepts: each "
                        "TPM's EK certificate must chain to one, and it gets an attestation "
                        "key (key attestation; default: off)")
    parser.add_argument("--manufacturer-intermediates", type=Path, metavar="PEM",
                        help="intermediate CA certificates for the EK chains, if the TPMs "
                        "do not carry them")
    parser.add_argument("--force", action="store_true",
                        help="re-provision; the old bootstrap certificate is revoked")
    args = parser.parse_args(argv)
    os.environ.setdefault("TSS2_LOG", "all+none")
    try:
        return _batch(args) if args.batch else _single(args)
    except (IdentityError, OSError) as exc:
        print(f"device-provision: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
