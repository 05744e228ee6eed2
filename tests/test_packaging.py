"""The default install is the device's; the back office, broker tooling and simulator are extras.

The wheel is built offline from a copy of the checkout and judged by its own METADATA and
file list. A venv with the wheel and its core dependencies only (their installed files
copied from this venv, as RECORD lists them: nothing is downloaded) runs the device's
commands, and the back office's name the extra they lack instead of a traceback.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OURS = {"device_agent", "provisioning", "broker_config"}
NEVER_ON_A_DEVICE = {"aiohttp", "uvloop", "matplotlib", "hypothesis", "pytest",
                     "pytest-timeout", "mypy", "ruff", "setuptools"}
# what .gitignore keeps out of the repository, and the repository itself
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                     "__pycache__", ".*_cache", ".hypothesis", "demo-out")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy: in the tree, setuptools would also pack what an earlier build
    left in build/lib. No build isolation: the test extra brings setuptools, offline."""
    base = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, base / "src", ignore=NOT_SOURCES)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-index", "--no-build-isolation", "--wheel-dir", str(base / "out"),
                            str(base / "src")], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    (path,) = (base / "out").glob("*.whl")
    return path


def metadata(wheel: Path) -> tuple[list[Requirement], list[str]]:
    """Requires-Dist and Provides-Extra of the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(name).decode())
    return ([Requirement(line) for line in headers.get_all("Requires-Dist", [])],
            headers.get_all("Provides-Extra", []))


def core(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements if r.marker is None}


def third_party_imports(package: str) -> set[str]:
    """The distributions of what ``package``'s modules import, its own and the stdlib aside."""
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    names -= set(sys.stdlib_module_names) | OURS | {"__future__"}
    owners = importlib.metadata.packages_distributions()
    return {canonicalize_name(dist) for name in names for dist in owners[name]}


def test_the_core_dependencies_are_what_the_device_agent_imports(wheel: Path) -> None:
    requirements, extras = metadata(wheel)
    assert core(requirements) == third_party_imports("device_agent")
    assert not core(requirements) & NEVER_ON_A_DEVICE
    assert set(extras) == {"server", "broker", "simulator", "test"}
    by_extra = {r.name: str(r.marker) for r in requirements if r.marker}
    assert by_extra["aiohttp"] == 'extra == "server"'
    assert by_extra["uvloop"] == 'extra == "server"'  # est-server's event loop
    assert by_extra["python-pkcs11"] == 'extra == "server"'  # CA keys in a token
    assert by_extra["matplotlib"] == 'extra == "simulator"'


def test_the_wheel_leaves_the_simulator_and_benchmarks_to_the_checkout(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top = {name.partition("/")[0] for name in archive.namelist()}
        entry_points = next(archive.read(n).decode() for n in archive.namelist()
                            if n.endswith(".dist-info/entry_points.txt"))
    assert {t for t in top if not t.endswith(".dist-info")} == OURS
    assert "est-server = provisioning._commands:est_server" in entry_points
    assert "fleet-sim = provisioning._commands:fleet_sim" in entry_points


def test_the_readme_says_what_to_install_where(wheel: Path) -> None:
    section = (ROOT / "README.md").read_text().partition("\n## What to install where\n")[2]
    section = section.partition("\n## ")[0]
    for extra in metadata(wheel)[1]:
        assert re.search(rf"pip install [^`]*\[[a-z,]*\b{extra}\b", section), extra


def dependency_closure(requirements: list[Requirement]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` need, with theirs, on this Python."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(name)
        for line in dist.requires or []:
            need = Requirement(line)
            if need.marker is None or any(need.marker.evaluate({"extra": extra})
                                          for extra in requirement.extras or {""}):
                todo.append(need)
    return list(found.values())


@pytest.fixture(scope="module")
def device_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([python, "-c", purelib], check=True, capture_output=True,
                               text=True).stdout.strip())
    requirements = [r for r in metadata(wheel)[0] if r.marker is None]
    for dist in dependency_closure(requirements):
        for file in dist.files or []:
            source = Path(str(file.locate()))
            if file.parts[0] != ".." and source.is_file():  # scripts in bin/ aside
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / file)
    pip = [sys.executable, "-m", "pip", "--python", python]
    installed = subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    checked = subprocess.run([*pip, "check"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout  # the core's closure is all there
    return venv


def run_in(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=venv, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_device_install_runs_the_device_commands(device_venv: Path) -> None:
    for command in ("device-agent", "device-provision", "device-pki", "broker-config"):
        result = run_in(device_venv, command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {command}")
    every_module = ("import importlib, importlib.util, pkgutil, device_agent\n"
                    "for m in pkgutil.walk_packages(device_agent.__path__, 'device_agent.'):\n"
                    "    importlib.import_module(m.name)\n"
                    "print(*(importlib.util.find_spec(n) for n in "
                    "('aiohttp', 'matplotlib', 'simulator', 'hypothesis')))")
    result = run_in(device_venv, "python", "-c", every_module)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None"] * 4


def test_a_device_install_names_the_extra_a_back_office_command_needs(
        device_venv: Path) -> None:
    result = run_in(device_venv, "est-server", "--help")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"est-server: needs {name}: pip install 'tpm-device-identity[server]'"
        for name in ("aiohttp", "uvloop")]
    result = run_in(device_venv, "fleet-sim", "--help")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("fleet-sim: needs simulator: not in the wheel: it runs from "
                                    "a source checkout")
    assert "Traceback" not in result.stderr
