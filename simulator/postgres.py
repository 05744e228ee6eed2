"""A PostgreSQL server of its own, for tests and benchmarks of the shared registry.

PostgreSQL refuses to run as root, and the tests run as root: initdb and pg_ctl run as
the ``postgres`` user (the Debian package creates it) in a temporary directory handed
to that user. The server listens on a unix socket in that directory only (no TCP),
trusts every local connection, and is stopped with ``pg_ctl stop -m immediate``: its
data is thrown away with the directory. Each caller gets databases of its own from
:meth:`PostgreSQL.new_database` (CREATE DATABASE from ``template0``).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .processes import ComponentError, require

USER = "postgres"


class PostgreSQL:
    """initdb, start, databases on demand, stop; a context manager."""

    def __init__(self, parent: Path | None = None) -> None:
        self._parent = parent
        self.directory = Path()
        self._names = itertools.count(1)

    def __enter__(self) -> PostgreSQL:
        initdb, self._pg_ctl = require("initdb"), require("pg_ctl")
        self.directory = Path(tempfile.mkdtemp(prefix="postgres-test-", dir=self._parent))
        try:
            self._own()
            self._run([initdb, "-D", str(self.data), "-U", USER, "--auth=trust",
                       "--encoding=UTF8", "--locale=C", "--no-sync"])
            self._run([self._pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                       "-o", f"-k {self.directory} -c listen_addresses='' -c max_connections=200",
                       "start"])
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._run([self._pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """libpq's URL for ``database`` over the unix socket in :attr:`directory`."""
        return f"postgresql://{USER}@/{database}?host={self.directory}"

    def new_database(self, prefix: str = "registry") -> str:
        """A new, empty database; its URL."""
        import psycopg  # the server extra; only the callers that need a database load it

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def _own(self) -> None:
        """Hand the directory to the ``postgres`` user when running as root."""
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam(USER)
        except KeyError:
            raise ComponentError(f"no {USER} user: apt-get install postgresql "
                                 "(or run make setup)") from None
        os.chown(self.directory, user.pw_uid, user.pw_gid)

    def _run(self, argv: list[str]) -> None:
        """As the ``postgres`` user when running as root (PostgreSQL refuses root)."""
        if os.geteuid() == 0:
            argv = [require("runuser"), "-u", USER, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              cwd=self.directory, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise ComponentError(f"{Path(argv[0]).name} {' '.join(argv[1:])} failed "
                                 f"({done.returncode}): {done.stderr.strip()}\n{log}")
