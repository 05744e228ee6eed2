"""One piece of credential work in a short-lived process: the agent's heavy half.

Making a TPM key, having the TPM sign a CSR, the EST exchange and checking the
certificate need ``tpm2_pytss`` and ``cryptography``, which cost the agent
about 17 MB for as long as it runs while it uses them a few times a week
(issue 15). The job (``python -m device_agent.credential_job``) imports them first,
then reads its work order on stdin: one JSON line (``work``, ``generation``,
``check_time``, ``source``; ``job_process.order``) and the agent's running
configuration (a reload the agent refused must not reach the job). So the agent can
start it before it knows the work, at a first boot while it starts itself; a job
whose stdin closes before an order exits without answering. It answers one JSON
line on stdout:

* ``{"outcome": "issued", "generation": N}``: a complete generation N is staged
  in the credential store, its facts beside it (credentials.py);
* ``{"outcome": "time", "server_now": ISO-8601 or null}``: the EST server's clock;
* ``{"outcome": "refused", "status": S, "reason": R, "retry_after": s or null}``;
* ``{"outcome": "failed", "error": E, "retry_after": s or null}``, with ``"tpm": true``
  when the TPM failed (the agent counts these, health.py).

SIGTERM (the agent is stopping) ends retries; the job still answers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import AgentConfig
from .errors import ESTError, IdentityError, TPMError

log = logging.getLogger(__name__)

WORKS = ("enroll", "bootstrap", "renew", "recovery", "clock", "expiry-check", "due-check")
GENERATIONAL = ("renew", "recovery")  # work on the generation the order names


def answer_of(run: Callable[[], object]) -> dict[str, Any]:
    """Run the work; its answer as the agent reads it, whatever happened."""
    from .credentials import Generation

    try:
        value = run()
    except ESTError as exc:
        if exc.status is None:
            return {"outcome": "failed", "error": str(exc), "retry_after": exc.retry_after}
        return {"outcome": "refused", "status": exc.status, "reason": exc.reason or str(exc),
                "retry_after": exc.retry_after}
    except IdentityError as exc:
        return _failed(exc)
    if isinstance(value, Generation):
        return {"outcome": "issued", "generation": value.number}
    assert value is None or isinstance(value, dt.datetime), value
    return {"outcome": "time", "server_now": value.isoformat() if value else None}


def run_work(config: AgentConfig, work: str, generation: int | None, check_time: bool,
             stop: threading.Event) -> dict[str, Any]:
    from .credentials import CredentialStore, Generation
    from .enroll import Enroller
    from .keystore import is_file_keystore, open_keystore
    from .tls import bind_provider_tcti

    if not is_file_keystore(config.device.tcti):
        bind_provider_tcti(config.device.tcti)
    store = CredentialStore(config.paths.state_dir)
    try:
        with open_keystore(config.device.tcti) as tpm:
            enroller = Enroller(config, tpm, store, stop)
            enroller.check_time = check_time
            if work in GENERATIONAL:
                if generation is None:
                    raise ValueError(f"{work} needs a generation")
                current = Generation(generation, store.root / f"gen-{generation:06d}")
                if work == "renew":
                    return answer_of(lambda: enroller.renew(current, attempts=1))
                return answer_of(lambda: enroller.recover(current, attempts=1))
            if work == "enroll":
                return answer_of(enroller.enroll)
            if work == "bootstrap":
                return answer_of(lambda: enroller.enroll(attempts=1))
            return answer_of(enroller.server_time)
    except IdentityError as exc:  # the TPM could not be opened
        return _failed(exc)


def _failed(exc: IdentityError) -> dict[str, Any]:
    answer: dict[str, Any] = {"outcome": "failed", "error": str(exc), "retry_after": None}
    if isinstance(exc, TPMError):
        answer["tpm"] = True
    return answer


def preload() -> None:
    """What any credential work needs (tpm2-pytss and cryptography among it), imported
    before the order arrives: the agent may start this job ahead of its first work."""
    from . import credentials, enroll, keystore, tls, tpm  # noqa: F401


def name_process(work: str) -> None:
    """``job-<work>`` as this process's name (what ps, top and /proc/PID/comm show), since
    its command line cannot say the work: it was started before the order came."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(f"job-{work}"[:15])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_agent.credential_job",
                                     description="a work order and the configuration on stdin")
    parser.parse_args(argv)
    os.environ.setdefault("TSS2_LOG", "all+none")
    logging.basicConfig(level=os.environ.get("DEVICE_AGENT_LOG", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    preload()
    header = sys.stdin.readline()
    if not header:
        return 0  # started ahead, not needed: the agent stopped or did other work
    try:
        order = json.loads(header)
        work, generation = order["work"], order.get("generation")
        if work not in WORKS or not (generation is None or isinstance(generation, int)):
            raise ValueError(f"not a work order: {header.strip()!r}")
        if work in GENERATIONAL and generation is None:
            raise ValueError(f"{work} needs a generation")
    except (ValueError, KeyError, TypeError) as exc:
        answer: dict[str, Any] = {"outcome": "failed", "error": f"bad work order: {exc}",
                                  "retry_after": None}
    else:
        name_process(work)
        try:
            config = AgentConfig.from_toml(sys.stdin.read(), str(order.get("source", "<agent>")))
            answer = run_work(config, work, generation, bool(order.get("check_time", True)),
                              stop)
        except IdentityError as exc:
            answer = {"outcome": "failed", "error": str(exc), "retry_after": None}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
