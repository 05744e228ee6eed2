"""``broker-config``: render a Mosquitto directory from the PKI, enforce a revocation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from provisioning.pki import PKIPaths

from . import revocation
from .deploy import render_broker
from .errors import BrokerConfigError


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
    render.add_argument("--crl", type=Path, help="Device CA CRL (default: sign an empty one)")
    enforce = commands.add_parser("enforce", help="install a CRL, reload, end the sessions")
    enforce.add_argument("device_id")
    enforce.add_argument("--broker", type=Path, required=True, help="rendered broker directory")
    enforce.add_argument("--crl", type=Path, required=True, help="CRL listing the certificate")
    enforce.add_argument("--serial", type=lambda s: int(s, 16), help="revoked serial (hex)")
    refresh = commands.add_parser("refresh-crl", help="install a re-issued CRL and reload")
    refresh.add_argument("--broker", type=Path, required=True)
    refresh.add_argument("--crl", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "render":
            layout = render_broker(PKIPaths(args.pki), args.out, port=args.port, bind=args.bind,
                                   backend_identity=args.backend_identity or None,
                                   user=args.user, crl=args.crl)
            print(layout.conf)
        elif args.command == "enforce":
            done = revocation.enforce(args.broker, args.device_id, args.crl.read_bytes(),
                                      serial=args.serial)
            print(f"{done.device_id}: CRL installed, broker {done.broker_pid} reloaded, "
                  f"session ended; enforce took {done.seconds * 1000:.0f} ms")
        else:
            pid = revocation.refresh_crl(args.broker, args.crl.read_bytes())
            print(f"CRL installed, broker {pid} reloaded")
    except (BrokerConfigError, OSError, ValueError) as exc:
        print(f"broker-config: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
