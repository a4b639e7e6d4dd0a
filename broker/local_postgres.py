"""A private PostgreSQL cluster on a free loopback port (tests, `make scale`), like LocalMosquitto.

initdb and pg_ctl refuse to run as root, so as root the cluster belongs to `nobody` in a
folder of its own under /tmp (a pytest folder is private to root, which `nobody` cannot
enter). Trust authentication on 127.0.0.1 only: for tests and benchmarks, never a fleet.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from broker.local import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
INSTALL_HINT = "install it with: sudo apt-get install -y postgresql"
USER = "edge"


class PostgresError(Exception):
    """The local PostgreSQL cannot be found or does not come up."""


def pg_binary(name: str) -> str:
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise PostgresError(f"PostgreSQL's {name} is not installed; {INSTALL_HINT}")
    return found


class LocalPostgres:
    """A PostgreSQL cluster of our own; `dsn(db)` names a database in it."""

    def __init__(self, *, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "max_connections": "200",
            "shared_buffers": "128MB",
            # A test cluster: losing the last transactions in a power cut is fine.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        self.root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self._as_nobody = os.geteuid() == 0

    def _run(self, *argv: str, timeout: float = 60) -> None:
        user = pwd.getpwnam("nobody") if self._as_nobody else None

        def demote() -> None:
            if user is not None:
                os.setgid(user.pw_gid)
                os.setgroups([])
                os.setuid(user.pw_uid)

        done = subprocess.run(
            argv,
            preexec_fn=demote,
            capture_output=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )
        if done.returncode != 0:
            log = (
                self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            )
            raise PostgresError(
                f"{Path(argv[0]).name} failed ({done.returncode}): "
                f"{done.stderr.decode(errors='replace')[-2000:]}{log}"
            )

    def start(self) -> None:
        if self._as_nobody:
            user = pwd.getpwnam("nobody")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run(
            pg_binary("initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.port}\nunix_socket_directories = '{self.root}'\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")
        self._run(
            pg_binary("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "30",
            "start",
        )
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name we chose
        return self.dsn(name)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.data.is_dir() and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresError, subprocess.TimeoutExpired):
                self._run(pg_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
