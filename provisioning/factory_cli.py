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

On a real line (issue 17) the Factory CA's key stays on the line server: with
--service https://HOST:PORT, --station-cert, --station-key and --service-trust
(what ``factory-ca station add`` wrote) instead of --pki and --registry, the CSR the
TPM signed goes to ``factory-ca serve``, which verifies it, signs and registers the
device; --trust-anchor names the trust.pem to write (the operator root). --force is
sent on to the service (replacing another station's device). A refusal, or a
station killed at any step, leaves no files; a re-run completes the device. The
command exits 3 when the service refused (a batch row carries its HTTP "status").
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
from .factory import BootstrapIssuer, LineSettings, LocalFactoryCA, provision
from .factory_remote import RemoteFactoryCA, RemoteRefused, no_registrar, station_context
from .registry import Registrar, registrar

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
        server_trust=args.trust_anchor or pki.PKIPaths(args.pki).server_trust,
        state_dir=args.state_dir,
        installed_dir=args.installed_dir, api_socket=args.api_socket,
        service_group=_service_group(args.group), recovery_url=args.recovery_url,
        manufacturer_roots=_certificates(args.manufacturer_roots, "--manufacturer-roots"),
        manufacturer_intermediates=_certificates(args.manufacturer_intermediates,
                                                 "--manufacturer-intermediates"),
    )


def _mode(args: argparse.Namespace) -> None:
    """Local (--pki, --registry) or remote (--service and the station's files), not both."""
    remote = ("--station-cert", "--station-key", "--service-trust", "--trust-anchor")
    if args.service:
        if args.pki or args.registry:
            raise IdentityError("--service replaces --pki and --registry: give one or the other")
        missing = [name for name in remote
                   if getattr(args, name[2:].replace("-", "_")) is None]
        if missing:
            raise IdentityError(f"--service needs {', '.join(missing)}")
    elif not (args.pki and args.registry):
        raise IdentityError("give --pki and --registry (local Factory CA), or --service with "
                            "the station's credentials")


def _signer(args: argparse.Namespace) -> LocalFactoryCA | BootstrapIssuer:
    if args.service:
        context = station_context(args.station_cert, args.station_key, args.service_trust)
        return RemoteFactoryCA(args.service, context, force=args.force,
                               attempts=args.service_attempts)
    passphrase = None
    if args.passphrase_file:
        try:
            passphrase = Path(args.passphrase_file).read_bytes().strip()
        except OSError as exc:
            raise IdentityError(f"cannot read {args.passphrase_file}: {exc.strerror}") from exc
    return LocalFactoryCA(pki.PKIPaths(args.pki), passphrase)


def _registrar(args: argparse.Namespace) -> Registrar:
    return no_registrar if args.service else registrar(args.registry)


def _batch(args: argparse.Namespace) -> int:
    """Rows of device_id,tcti,out_dir[,recovery_url]; a header row is optional."""
    line, signer, register = _line(args), _signer(args), _registrar(args)
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
                status = exc.status if isinstance(exc, RemoteRefused) else None
                print(json.dumps({"row": number, "device_id": device_id, "ok": False,
                                  "error": str(exc), "status": status}), flush=True)
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
                        _registrar(args), force=args.force)
    print(summary.to_json())
    if line.service_group is None:
        print(NO_GROUP_NOTE, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device-provision", description=__doc__)
    parser.add_argument("--pki", type=Path, help="PKI directory (device-pki init): the local "
                        "Factory CA")
    parser.add_argument("--registry", type=Path, help="registry database (local mode)")
    parser.add_argument("--service", metavar="URL",
                        help="https://HOST:PORT of factory-ca serve, instead of --pki/--registry")
    parser.add_argument("--station-cert", type=Path, help="this station's certificate (PEM)")
    parser.add_argument("--station-key", type=Path, help="this station's key (PEM)")
    parser.add_argument("--service-trust", type=Path,
                        help="the Station CA the service's certificate chains to (PEM)")
    parser.add_argument("--service-attempts", type=int, default=3,
                        help="tries per device when the service does not answer, or answers "
                        "429 or 503 (default: %(default)s)")
    parser.add_argument("--trust-anchor", type=Path,
                        help="the trust.pem written for the agent (the operator root; "
                        "default with --pki: its root/ca.pem)")
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
        _mode(args)
        return _batch(args) if args.batch else _single(args)
    except RemoteRefused as exc:
        print(f"device-provision: {exc}", file=sys.stderr)
        return 3
    except (IdentityError, OSError) as exc:
        print(f"device-provision: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
