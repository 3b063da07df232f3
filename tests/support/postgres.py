"""A real, throwaway PostgreSQL server for the scale-out tests (Debian's `postgresql` package).

initdb refuses to run as root, so as root the server runs as the `postgres` user the package creates.
Trust authentication on 127.0.0.1 and a free port; the cluster lives in a temporary folder. With `user`,
the database belongs to a role that must authenticate with its password (scram-sha-256), as in production,
so a worker that lost the password cannot connect.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional


def postgres_bin() -> Optional[Path]:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").exists():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def skip_without_postgres() -> None:
    """Skip the calling test or fixture where Debian's postgresql package is not installed."""
    import pytest

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")


def free_port() -> int:
    """A loopback port nobody listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """A running throwaway server: its SQLAlchemy URL, and a restart on the same port (the database kept)."""

    url: str
    _pg_ctl: list[str]
    _start_options: list[str]

    def restart(self, down_seconds: float = 2.0) -> None:
        """Stop the server (fast: every client connection is cut, as in a real restart), leave it down for
        `down_seconds`, start it again on the same port with the same data."""
        subprocess.run([*self._pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True, timeout=60)
        time.sleep(down_seconds)
        subprocess.run([*self._pg_ctl, *self._start_options, "start"], check=True, capture_output=True, timeout=60)


def running_postgres(user: Optional[tuple[str, str]] = None) -> Iterator[str]:
    """Start a server, create database `mnv3`, yield its SQLAlchemy URL, stop it. `user`: (name, password)
    of the role that owns the database and logs in with its password; the URL then carries both."""
    for server in restartable_postgres(user):
        yield server.url


def restartable_postgres(user: Optional[tuple[str, str]] = None) -> Iterator[PostgresServer]:
    """As running_postgres, yielding the server itself, which a test can restart in the middle of a run."""
    binaries = postgres_bin()
    assert binaries is not None
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mnv3-pg-"))
    os.chmod(folder, 0o777)
    data, log = folder / "data", folder / "server.log"
    port = free_port()
    pg_ctl = [*as_postgres, str(binaries / "pg_ctl"), "-D", str(data)]
    start_options = ["-l", str(log), "-w", "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"]

    def run(*cmd: str) -> None:
        subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if user:  # the first matching line wins: this role needs its password, the superuser stays trusted
            hba = data / "pg_hba.conf"
            hba.write_text(f"host all {user[0]} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        subprocess.run([*pg_ctl, *start_options, "start"], check=True, capture_output=True, timeout=120)
        psql = [str(binaries / "psql") if (binaries / "psql").exists() else "psql", "-h", "127.0.0.1", "-p", str(port),
                "-U", "postgres", "-c"]
        if user:
            run(*psql, f"CREATE ROLE {user[0]} LOGIN PASSWORD '{user[1]}'")
            run(*psql, f"CREATE DATABASE mnv3 OWNER {user[0]}")
            yield PostgresServer(f"postgresql+psycopg2://{user[0]}:{user[1]}@127.0.0.1:{port}/mnv3", pg_ctl,
                                 start_options)
            return
        run(*psql, "CREATE DATABASE mnv3")
        yield PostgresServer(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mnv3", pg_ctl, start_options)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
