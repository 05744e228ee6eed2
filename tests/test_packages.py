"""What the project calls comes from a package that scripts/setup.sh installs.

simulator/debian-packages.txt is the one list: set-up installs it, ``require`` names a
missing program's package from it, the README states it. These tests hold the code and
the README to the list; the fresh-root lanes (``make test-fresh``) prove the list is
enough on a machine where nothing else was installed.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.processes import debian_packages, package_of, require, require_library

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("device_agent", "provisioning", "broker_config", "simulator", "tests", "benchmarks",
           "systemtests")
RUNNERS = {f"subprocess.{name}" for name in ("run", "Popen", "call", "check_call",
                                              "check_output")}


def python_files() -> Iterator[Path]:
    for folder in SOURCES:
        yield from (path for path in sorted((ROOT / folder).rglob("*.py"))
                    if path != Path(__file__).resolve())  # this file names unlisted programs


def calls(path: Path) -> Iterator[tuple[str, ast.Call]]:
    """Each call with the name it calls; ``subprocess.run`` is "subprocess.run"."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                yield (f"{owner}.{func.attr}" if owner == "subprocess" else func.attr), node
            else:
                yield getattr(func, "id", ""), node


def literal_program(node: ast.Call, position: int = 0) -> str | None:
    """The program named by a literal argument: "prog" or ["prog", ...]."""
    if len(node.args) <= position:
        return None
    first = node.args[position]
    if isinstance(first, ast.List | ast.Tuple) and first.elts:
        first = first.elts[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def test_every_listed_package_is_installed_and_provides_what_is_listed() -> None:
    for package, items in debian_packages().items():
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True, check=False).stdout
        assert status == "install ok installed", f"{package}: run make setup"
        for item in items:
            if item == "(build)":
                continue
            if item.startswith("lib:"):
                assert require_library(item.removeprefix("lib:"))
            else:
                assert require(item)


def test_every_program_the_code_calls_is_listed_and_goes_through_require() -> None:
    seen: set[str] = set()
    for path in python_files():
        for name, node in calls(path):
            program = literal_program(node, 1 if name == "Process" else 0)
            if program is None:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name in RUNNERS:
                pytest.fail(f"{where} runs {program!r} directly: use require({program!r})")
            if name in ("require", "Process"):
                seen.add(program)
                package_of(program)  # raises if no listed package provides it
            elif name == "require_library":
                seen.add(f"lib:{program}")
                package_of(f"lib:{program}")
    # the scan itself must find the programs we know are called
    assert {"swtpm", "dbus-daemon", "mosquitto", "openssl", "kill"} <= seen


def test_the_shipped_units_call_only_listed_programs() -> None:
    units = sorted((ROOT / "device_agent" / "data").glob("*.service"))
    assert units
    for unit in units:
        for line in unit.read_text().splitlines():
            if re.match(r"Exec(Start|Reload|Stop)\w*=", line):
                program = Path(line.split("=", 1)[1].split()[0].lstrip("-+!@:"))
                if program.name == "device-agent":
                    continue  # ours, installed by the package
                assert package_of(program.name), line


def test_readme_states_the_same_packages() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"the\s+Debian\s+packages\s+`([^`]+)`", readme)
    assert match, "README no longer states the package list"
    assert match.group(1).split() == list(debian_packages())


def test_a_program_missing_from_the_list_is_an_error_not_a_guess() -> None:
    with pytest.raises(LookupError):
        require("not-a-real-program")
    assert shutil.which("true")  # present on the machine, still refused: not listed
    with pytest.raises(LookupError):
        require("true")
