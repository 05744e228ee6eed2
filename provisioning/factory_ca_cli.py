"""``factory-ca``: the line server's Factory CA as a service, and the stations it serves.

    factory-ca init --config factory.toml [--hostname HOST ...]
    factory-ca station add NAME --out DIR --config factory.toml
    factory-ca station revoke NAME --config factory.toml
    factory-ca station list --config factory.toml
    factory-ca serve --config factory.toml

``init`` makes the Station CA and the service's TLS certificate in the configured
stations directory; ``station add`` writes a station's key, certificate and the trust
anchor for the service into DIR, to copy to that station; ``station revoke`` takes
effect on the station's next request, no restart needed. ``serve`` needs the
``server`` extra (aiohttp); the other commands need only the core. The Station CA's
key is protected like the PKI's, with ``[pki] passphrase_file`` when it is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from device_agent.errors import IdentityError

from .factory_config import load_config
from .factory_stations import StationPaths, add_station, init_stations, read_book, revoke_station


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="factory-ca", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="make the Station CA and the service certificate")
    init.add_argument("--config", required=True, type=Path)
    init.add_argument("--hostname", action="append",
                      help="name or address stations reach the service at (repeatable; "
                           "default: localhost and 127.0.0.1)")
    serve = commands.add_parser("serve", help="run the signing service")
    serve.add_argument("--config", required=True, type=Path)
    station = commands.add_parser("station", help="add, revoke or list stations")
    actions = station.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="issue a station its key and certificate")
    add.add_argument("name")
    add.add_argument("--out", required=True, type=Path)
    add.add_argument("--config", required=True, type=Path)
    revoke = actions.add_parser("revoke", help="refuse a station from its next request on")
    revoke.add_argument("name")
    revoke.add_argument("--config", required=True, type=Path)
    listing = actions.add_parser("list", help="the station book as JSON lines")
    listing.add_argument("--config", required=True, type=Path)
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.command == "serve":
        from .factory_service import serve  # aiohttp: the server extra

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        asyncio.run(serve(config))
        return 0
    if args.command == "init":
        paths = init_stations(config.stations, args.hostname or ["localhost", "127.0.0.1"],
                              config.passphrase())
        print(json.dumps({"station_ca": str(paths.ca), "service_cert": str(paths.service_cert)}))
        return 0
    if args.action == "add":
        entry = add_station(config.stations, args.name, args.out, config.passphrase())
        print(json.dumps({**entry.__dict__, "out": str(args.out)}))
    elif args.action == "revoke":
        for entry in revoke_station(config.stations, args.name):
            print(json.dumps(entry.__dict__))
    else:
        for entry in read_book(StationPaths(config.stations).book):
            print(json.dumps(entry.__dict__))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        return _run(args)
    except (IdentityError, OSError, ValueError) as exc:
        print(f"factory-ca: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
