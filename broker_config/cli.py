"""``broker-config``: render a Mosquitto directory from the PKI, enforce a revocation.

Every command that installs a CRL refuses one that would roll the installed CRL
back (crl.py) unless ``--force``; the refusal exits 1 and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from provisioning.errors import ProvisioningError
from provisioning.pki import PKIPaths
from provisioning.registry import DeviceState, open_registry

from . import revocation
from .crl import ExpiryLookup, registry_expiries
from .deploy import render_broker
from .errors import BrokerConfigError

REGISTRY_HELP = "registry that tells expired certificates (which may leave the CRL) " \
    "from un-revoked ones; with refresh-crl, the device states the broker's bans follow"


def _crl_options(command: argparse.ArgumentParser, registry_default: str) -> None:
    command.add_argument("--registry", type=Path, help=f"{REGISTRY_HELP} ({registry_default})")
    command.add_argument("--force", action="store_true",
                         help="install a CRL even if it is older than the installed one or "
                              "leaves out a certificate it revokes")


def _expiries(registry: Path | None) -> ExpiryLookup | None:
    return registry_expiries(registry) if registry is not None else None


def _states(registry: Path | None) -> dict[str, DeviceState] | None:
    if registry is None:
        return None
    if not registry.is_file():
        raise BrokerConfigError(f"no registry at {registry}")
    try:
        with open_registry(registry) as opened:
            return opened.states()
    except ProvisioningError as exc:
        raise BrokerConfigError(f"cannot read the registry {registry}: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="write mosquitto.conf, ACL, TLS copies, state")
    render.add_argument("--pki", type=Path, required=True, help="PKI directory (init_pki)")
    render.add_argument("--out", type=Path, required=True, help="broker directory to write")
    render.add_argument("--port", type=int, default=8883)
    render.add_argument("--bind", default="127.0.0.1")
    render.add_argument("--backend-identity", default="backend",
                        help="certificate CN of the back-end service")
    render.add_argument("--user", default="mosquitto", help="user the broker drops to")
    render.add_argument("--crl", type=Path,
                        help="Device CA CRL to install (default: the PKI's device-ca/crl.pem)")
    _crl_options(render, "default: PKI/registry.sqlite3 if it exists")
    enforce = commands.add_parser("enforce", help="install a CRL, reload, end the sessions")
    enforce.add_argument("device_id")
    enforce.add_argument("--broker", type=Path, required=True, help="rendered broker directory")
    enforce.add_argument("--crl", type=Path, required=True, help="CRL listing the certificate")
    enforce.add_argument("--serial", type=lambda s: int(s, 16), help="revoked serial (hex)")
    enforce.add_argument("--registry", type=Path, help=REGISTRY_HELP)
    refresh = commands.add_parser("refresh-crl", help="install a re-issued CRL and reload "
                                  "(a no-op if it is the installed one)")
    refresh.add_argument("--broker", type=Path, required=True)
    refresh.add_argument("--crl", type=Path, required=True)
    _crl_options(refresh, "without one, no revoked certificate may leave the CRL")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "render":
            layout = render_broker(PKIPaths(args.pki), args.out, port=args.port, bind=args.bind,
                                   backend_identity=args.backend_identity or None,
                                   user=args.user, crl=args.crl, registry=args.registry,
                                   force=args.force)
            print(layout.conf)
        elif args.command == "enforce":
            done = revocation.enforce(args.broker, args.device_id, args.crl.read_bytes(),
                                      serial=args.serial, expiries=_expiries(args.registry))
            print(f"{done.device_id}: CRL installed for broker {done.broker_pid} (its next "
                  f"handshakes check it), session ended; enforce took "
                  f"{done.seconds * 1000:.0f} ms"
                  if done.broker_pid is not None else
                  f"{done.device_id}: CRL installed; the broker is not running and reads it "
                  "when it starts (refresh-crl --registry bans the device then)")
        else:
            refreshed = revocation.refresh_crl(args.broker, args.crl.read_bytes(),
                                               expiries=_expiries(args.registry),
                                               force=args.force,
                                               states=_states(args.registry))
            print(refreshed.describe())
    except (BrokerConfigError, OSError, ValueError) as exc:
        print(f"broker-config: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
