"""``device-pki``: the operator's command for the CAs, the registry and held requests.

Every command that changes revocation or a device's state goes through the one
revocation service (revocation.py): the registry, the Device CA's CRL and each
``--broker`` change in one call, so the file the broker reads never lags the
registry and a device's ban follows its state.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from device_agent.errors import ConfigError, IdentityError

from . import pki
from .errors import PKIError
from .est_config import parse_duration
from .fleet_report import fleet_report
from .registry import location, open_registry, registrar
from .revocation import Revocations

BROKER_HELP = "a broker directory (broker-config render) to enforce it on now (repeatable)"


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if args.passphrase_file is None:
        return None
    try:
        return Path(args.passphrase_file).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise PKIError(f"cannot read the passphrase file: {exc}") from exc


def _paths(args: argparse.Namespace) -> pki.PKIPaths:
    return pki.PKIPaths(Path(args.pki))


def _registry_path(args: argparse.Namespace) -> Path | str:
    return location(args.registry) if args.registry else _paths(args).registry


def _read_cert(path: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read a PEM certificate from {path}: {exc}") from exc


def _device_ca(args: argparse.Namespace) -> pki.Authority:
    """Unlocked before any change, so a wrong passphrase (or PIN) leaves the registry as it
    was; a key in a token is given back when the command ends (``main``'s ExitStack)."""
    authority = pki.open_authority(_paths(args).device_ca, _passphrase(args))
    resources = getattr(args, "resources", None)
    return resources.enter_context(authority) if resources is not None else authority


def revocations(args: argparse.Namespace) -> Revocations:
    """The revocation service for this PKI, registry, CRL and the ``--broker`` directories."""
    publishes = args.command not in ("suspend", "activate")
    return Revocations(_paths(args), _device_ca(args) if publishes else None,
                       _registry_path(args),
                       Path(args.crl) if args.crl else None,
                       [Path(b) for b in getattr(args, "broker", None) or ()])


def cmd_init(args: argparse.Namespace) -> str:
    args.pki = args.directory
    try:
        paths = pki.init_pki(args.directory, passphrase=_passphrase(args),
                             hostnames=args.host or ("localhost", "127.0.0.1"),
                             crl_lifetime=args.crl_lifetime, pkcs11=args.pkcs11)
    except FileExistsError as exc:
        raise PKIError(str(exc)) from exc
    service = revocations(args)
    with open_registry(_registry_path(args)) as registry:
        service.publish(registry)
    return (f"PKI in {paths.base}; CRL {service.crl_path} (valid "
            f"{pki.crl_lifetime(paths)}); registry {_registry_path(args)}")


def cmd_issue_server(args: argparse.Namespace) -> str:
    cert, key = pki.issue_server_files(_paths(args), args.name, args.host, _passphrase(args))
    return f"{cert} {key}"


def cmd_revoke(args: argparse.Namespace) -> str:
    return revocations(args).revoke(args.serial, pki.revocation_reason(args.reason)).describe()


def cmd_revoke_device(args: argparse.Namespace) -> str:
    return revocations(args).revoke_device(
        args.device, pki.revocation_reason(args.reason)).describe()


def cmd_crl(args: argparse.Namespace) -> str:
    service = revocations(args)
    with open_registry(_registry_path(args)) as registry:
        service.publish(registry)
    return str(service.crl_path)


def cmd_register(args: argparse.Namespace) -> str:
    previous = _read_cert(args.previous_cert) if args.previous_cert else None
    registrar(_registry_path(args))(args.device, _read_cert(args.bootstrap_cert), previous)
    return f"{args.device} allowlisted"


def cmd_decide(args: argparse.Namespace) -> str:
    with open_registry(_registry_path(args)) as registry:
        request = registry.decide(args.device, approve=args.command == "approve")
    return f"{request.device_id} {request.decision}"


def cmd_pending(args: argparse.Namespace) -> str:
    with open_registry(_registry_path(args)) as registry:
        held = registry.pending_requests()
    return "\n".join(f"{p.device_id}\t{p.requests} request(s) since {p.first_seen}\t"
                     f"bootstrap sha256 {p.bootstrap_fingerprint}" for p in held)


def cmd_state(args: argparse.Namespace) -> str:
    service = revocations(args)
    change = {"suspend": service.suspend, "activate": service.activate,
              "decommission": service.decommission}[args.command]
    return change(args.device).describe()


def cmd_report(args: argparse.Namespace) -> str:
    now = dt.datetime.now(dt.UTC)
    since = args.since if isinstance(args.since, dt.datetime) else now - args.since
    with open_registry(_registry_path(args)) as registry:
        report = fleet_report(registry, now, args.within, since)
    if args.json:
        return json.dumps(report.as_json(), indent=2)
    return report.describe()


def _moment(text: str) -> dt.timedelta | dt.datetime:
    """A duration back from now (7d, 12h) or an ISO 8601 time (UTC unless it says)."""
    try:
        return parse_duration(text, repr(text))
    except ConfigError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration such as 7d or an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _span(text: str) -> dt.timedelta:
    try:
        return parse_duration(text, repr(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pki", default=os.environ.get("DEVICE_PKI_DIR", "."),
                        help="PKI directory (default $DEVICE_PKI_DIR or .)")
    common.add_argument("--registry", help="registry: a SQLite file (default "
                        "PKI/registry.sqlite3) or a postgresql:// URL")
    common.add_argument("--passphrase-file", help="file holding the CA keys' passphrase")
    common.add_argument("--crl", help="where to publish the CRL (default PKI/device-ca/crl.pem)")
    top = argparse.ArgumentParser(prog="device-pki", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, handler: object, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_text)
        cmd.set_defaults(handler=handler)
        return cmd

    init = command("init", cmd_init, "create root, Device CA, Factory CA, EST and broker certs")
    init.add_argument("directory")
    init.add_argument("--host", action="append", help="server host name or IP (repeatable)")
    init.add_argument("--crl-lifetime", type=_span,
                      help="validity of each CRL (nextUpdate), e.g. 7d (default) or 60s; "
                           "the refresh timer must run well inside it")
    init.add_argument("--pkcs11", metavar="URI",
                      help="make the Device CA and Factory CA keys in this PKCS#11 token, "
                           "e.g. 'pkcs11:token=ca?module-path=/usr/lib/x86_64-linux-gnu/"
                           "softhsm/libsofthsm2.so&pin-source=file:/etc/device-pki/pin' "
                           "(each CA directory gets a ca.key.uri naming its key)")
    server = command("issue-server", cmd_issue_server, "issue servers/NAME.pem from the root")
    server.add_argument("name")
    server.add_argument("--host", action="append", required=True, help="repeatable")
    revoke = command("revoke", cmd_revoke, "revoke a certificate and republish the CRL")
    revoke.add_argument("serial", help="hexadecimal serial")
    revoke.add_argument("--reason", required=True, choices=sorted(pki.REVOCATION_REASONS),
                        type=lambda text: pki.revocation_reason(text).value)
    revoke.add_argument("--broker", action="append", help=BROKER_HELP)
    device = command("revoke-device", cmd_revoke_device,
                     "suspend a device, revoke every certificate it could still use, "
                     "republish the CRL and ban it on --broker")
    device.add_argument("device")
    device.add_argument("--reason", required=True, choices=sorted(pki.REVOCATION_REASONS),
                        type=lambda text: pki.revocation_reason(text).value)
    device.add_argument("--broker", action="append", help=BROKER_HELP)
    command("crl", cmd_crl, "publish the Device CA's CRL")
    register = command("register", cmd_register, "allowlist a device with its bootstrap cert")
    register.add_argument("device")
    register.add_argument("--bootstrap-cert", required=True)
    register.add_argument("--previous-cert", help="the bootstrap cert it replaces")
    command("pending", cmd_pending, "list enrollment requests held for an operator")
    report = command("report", cmd_report,
                     "fleet identity health: devices by state, certificates expiring, "
                     "recoveries, devices never renewed")
    report.add_argument("--within", type=_span, default=dt.timedelta(days=7),
                        help="expiry window, e.g. 7d (default) or 12h")
    report.add_argument("--since", type=_moment, default=dt.timedelta(days=7),
                        help="count issuances and recoveries from then on: a duration back "
                             "(default 7d) or an ISO 8601 time")
    report.add_argument("--json", action="store_true", help="one JSON object, for machines")
    for name, help_text in (("approve", "allowlist a held device"),
                            ("reject", "refuse a held device"),
                            ("suspend", "refuse the device's enrollments and broker sessions "
                                        "until activated"),
                            ("activate", "lift a suspension (and the ban on --broker)"),
                            ("decommission", "retire the device for good and revoke its "
                                             "certificates")):
        handler = cmd_decide if name in ("approve", "reject") else cmd_state
        state = command(name, handler, help_text)
        state.add_argument("device")
        if handler is cmd_state:
            state.add_argument("--broker", action="append", help=BROKER_HELP)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with contextlib.ExitStack() as args.resources:
            output = args.handler(args)
    except (IdentityError, ValueError) as exc:
        print(f"device-pki {args.command}: {exc}", file=sys.stderr)
        return 1
    if output:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
