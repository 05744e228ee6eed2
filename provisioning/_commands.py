"""Console scripts whose code or dependencies an install may lack.

A wheel installs every console script, whatever extras were asked for: a device install
(no extra) has ``est-server`` and ``fleet-sim`` too. Through ``launch`` such a command
says what to install instead of ending in an ImportError traceback. Standard library
only, and nothing imported before the check.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping

DISTRIBUTION = "tpm-device-identity"
CHECKOUT = (f"not in the wheel: it runs from a source checkout of {DISTRIBUTION} "
            "(make setup there, then .venv/bin/fleet-sim)")


def extra(name: str) -> str:
    return f"pip install '{DISTRIBUTION}[{name}]'"


def launch(command: str, module: str, needs: Mapping[str, str]) -> int:
    """``module.main()`` if every module in ``needs`` is importable; else, for each
    missing one, ``COMMAND: needs MODULE: HOW`` on stderr, and 1."""
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    for name in missing:
        print(f"{command}: needs {name}: {needs[name]}", file=sys.stderr)
    if missing:
        return 1
    return int(importlib.import_module(module).main())


def est_server() -> int:
    return launch("est-server", "provisioning.est_server",
                  {"aiohttp": extra("server"), "uvloop": extra("server")})


def factory_ca() -> int:
    """``factory-ca``: only ``serve`` needs aiohttp; station and init commands need the core."""
    needs = {"aiohttp": extra("server")} if sys.argv[1:2] == ["serve"] else {}
    return launch("factory-ca", "provisioning.factory_ca_cli", needs)


def fleet_sim() -> int:
    return launch("fleet-sim", "simulator.fleet", {
        "simulator": CHECKOUT,
        "aiohttp": extra("simulator"),
        "matplotlib": extra("simulator"),
    })
