"""``device-agent``: run the daemon, show its status, publish through it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import AgentConfig
from .errors import IdentityError

DEFAULT_CONFIG = Path("/etc/device-agent/agent.toml")


def _run(args: argparse.Namespace) -> int:
    from .job_process import ahead_of_first_boot

    standby = ahead_of_first_boot(args.config)  # before the daemon's own imports
    from .agent import Agent

    return Agent(args.config, standby).run()


def _status(args: argparse.Namespace) -> int:
    from .status import read_status

    config = AgentConfig.load(args.config)
    status = read_status(config.paths.state_dir)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if status.get("running") else 3
    if "error" in status and "state" not in status:
        print(status["error"])
        return 3
    link = status.get("link") or {}
    print(f"device        {status.get('device_id')}")
    print(f"running       {'yes' if status['running'] else 'no (last status shown)'}")
    print(f"state         {status.get('state')}")
    print(f"certificate   serial {status.get('cert_serial')}, "
          f"expires {status.get('cert_not_after')}, renews at {status.get('renew_at')}")
    print(f"broker        {status.get('broker')}: "
          f"{'connected' if status.get('connected') else 'not connected'}")
    print(f"outbox        {status.get('outbox_depth')} waiting, {status.get('outbox_dropped')} "
          f"dropped, last seq {status.get('last_seq')}")
    print(f"published     {link.get('published', 0)} sent, {link.get('acked', 0)} acknowledged")
    print(f"health        expires in {status.get('cert_expires_in_s')} s, "
          f"{status.get('reconnects')} reconnect(s), {status.get('tpm_errors')} TPM error(s)")
    last = status.get("last_renewal")
    if last:
        detail = f": {last['detail']}" if last.get("detail") else ""
        print(f"last renewal  {last['work']} {last['outcome']} at {last['at']}{detail}")
    for error in status.get("errors") or []:
        print(f"error         {error}")
    return 0 if status["running"] else 3


def _publish(args: argparse.Namespace) -> int:
    from .localapi import publish_via_socket

    config = AgentConfig.load(args.config)
    if config.api.socket is None:
        raise IdentityError(f"{args.config}: [api] socket is not configured")
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise IdentityError(f"--data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IdentityError("--data must be a JSON object")
    answer = publish_via_socket(config.api.socket, args.topic, data)
    if not answer.get("ok"):
        raise IdentityError(f"agent refused: {answer.get('error')}")
    print(json.dumps(answer))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon (systemd Type=notify)")
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="identity, certificate, connection, outbox, errors")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
    publish = sub.add_parser("publish", help="publish through the running agent")
    publish.add_argument("--topic", default="telemetry", help="suffix under devices/<id>/")
    publish.add_argument("--data", required=True, help="a JSON object")
    publish.set_defaults(func=_publish)
    for p in (run, status, publish):
        p.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TSS2_LOG", "all+none")
    logging.basicConfig(level=os.environ.get("DEVICE_AGENT_LOG", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except IdentityError as exc:
        print(f"device-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
