"""A fresh Debian root booted with systemd as PID 1 (systemd-nspawn), and commands in it.

The root comes from scripts/fresh-root.sh (debootstrap from this machine's apt
sources); packages are installed with apt as a user would. The container shares
this machine's network, so it reaches a back office on 127.0.0.1. On a host with a
mixed cgroup v1/v2 layout, nspawn gets a cgroup2 hierarchy mounted in a private
mount namespace first (systemd in the container needs the unified hierarchy).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from simulator.processes import ComponentError, require

REPO = Path(__file__).resolve().parent.parent
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


RELEASES = {"bookworm": "12", "trixie": "13"}


def host_release() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise ComponentError("cannot tell this machine's Debian release")


def target_release() -> str:
    """The release to boot: $DIST (bookworm or trixie), else this machine's."""
    dist = os.environ.get("DIST") or host_release()
    if dist not in RELEASES:
        raise ComponentError(f"DIST={dist}: bookworm or trixie")
    return dist


def cgroup_unified() -> bool:
    """Whether /sys/fs/cgroup is the cgroup2 hierarchy (not a v1 or mixed layout)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == "/sys/fs/cgroup":
            return fields[2] == "cgroup2"
    return False


def fresh_root(dist: str, base: Path) -> Path:
    """A new minimal root for ``dist`` under ``base`` (kept: the caller boots it)."""
    env = {**os.environ, "KEEP_ROOT": "1", "FRESH_ROOT_DIR": str(base)}
    result = subprocess.run([require("bash"), str(REPO / "scripts/fresh-root.sh"), dist, "true"],
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise ComponentError(f"fresh-root.sh failed:\n{result.stdout[-3000:]}{result.stderr}")
    return base / dist


def run_in_root(root: Path, *argv: str, timeout: float = 600) -> str:
    """Run a command in ``root`` without booting it (package installation)."""
    result = subprocess.run(
        [require("systemd-nspawn"), "--quiet", "--register=no", "--keep-unit",
         "--resolv-conf=copy-host", f"--directory={root}",
         "--setenv=DEBIAN_FRONTEND=noninteractive", *argv],
        capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ComponentError(f"{argv} in {root} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


class BootedRoot:
    """``root`` booted by systemd-nspawn; ``sh`` runs commands inside it through nsenter."""

    def __init__(self, root: Path, log: Path, binds: dict[Path, str]) -> None:
        self.root = root
        self.log = log
        self.binds = binds
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def __enter__(self) -> BootedRoot:
        nspawn = [require("systemd-nspawn"), "--boot", "--quiet", "--register=no",
                  "--keep-unit", "--resolv-conf=copy-host", f"--directory={self.root}",
                  *(f"--bind={host}:{inside}" for host, inside in self.binds.items())]
        argv = nspawn if cgroup_unified() else [
            require("unshare"), "--mount", "sh", "-c",
            'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh", *nspawn]
        with open(self.log, "ab") as out:
            self.nspawn = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.pid1 = self._find_pid1()
            self._wait_booted()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl", "is-system-running", check=False).strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise ComponentError(f"container not up after 60 s (state {state!r}); see {self.log}")

    def _find_pid1(self) -> int:
        assert self.nspawn is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ComponentError(f"systemd-nspawn exited {self.nspawn.returncode}: "
                                     f"{self.log.read_text()[-2000:]}")
            found = subprocess.run([require("pgrep"), "-x", "-P", str(self.nspawn.pid), "systemd"],
                                   capture_output=True, text=True, check=False).stdout.split()
            if found:
                return min(int(pid) for pid in found)
            time.sleep(0.2)
        raise ComponentError("the container's systemd did not start")

    def sh(self, *argv: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            [require("nsenter"), "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}",
             "LANG=C.UTF-8", *argv],
            capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ComponentError(f"{' '.join(argv)} exited {result.returncode}: "
                                 f"{result.stdout}{result.stderr}")
        return result.stdout

    def unit(self, name: str, *props: str) -> dict[str, str]:
        out = self.sh("systemctl", "show", name, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.sh("journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit,
                       check=False)

    def __exit__(self, *exc: object) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        # nspawn turns SIGTERM into a clean poweroff of a booted container
        os.killpg(self.nspawn.pid, signal.SIGTERM)
        try:
            self.nspawn.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(10)
