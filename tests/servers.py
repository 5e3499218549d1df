"""Throwaway servers for end-to-end tests: a PostgreSQL cluster and an `mlflow server` on it.

Each runs as a child process in its own process group on a free loopback port and is always
stopped when its `with` block ends, also when a test fails inside it; the PostgreSQL cluster's
files are removed with it.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import requests

from fat_mlflow.processes import ServerError, free_port, stop_group, wait_until

START_TIMEOUT_S = 180  # mlflow server needs ~1 min on a busy 2-core machine
STOP_TIMEOUT_S = 30
DEBIAN_PG_BINDIRS = "/usr/lib/postgresql"  # apt's postgresql-NN puts its binaries below here
PG_SERVICE_USER = "postgres"  # PostgreSQL refuses to run as root: who runs it then


class PostgresUnavailable(ServerError):
    """PostgreSQL cannot run on this machine (no binaries, no user to run it as, failed start)."""


@dataclass(frozen=True)
class Database:
    """A database on the throwaway cluster, reached over TCP with a password."""

    user: str
    password: str
    port: int
    name: str

    @property
    def dsn(self) -> str:
        """libpq URI, for psycopg2.connect."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.name}"

    @property
    def store_uri(self) -> str:
        """SQLAlchemy URI for `mlflow server --backend-store-uri`; names the driver because
        SQLAlchemy >= 2.1 maps a plain postgresql:// to psycopg 3, not psycopg2."""
        return self.dsn.replace("postgresql://", "postgresql+psycopg2://", 1)


def postgres_bindir() -> Path:
    """Folder of initdb/postgres: on PATH, else the newest Debian/Ubuntu postgresql-NN package."""
    on_path = shutil.which("initdb")
    if on_path:  # often a symlink (e.g. /usr/local/bin), not always with `postgres` beside it
        return Path(on_path).resolve().parent
    versions = sorted((p for p in Path(DEBIAN_PG_BINDIRS).glob("*/bin") if p.parent.name.isdigit()),
                      key=lambda p: int(p.parent.name))
    if not versions:
        raise PostgresUnavailable(
            f"no PostgreSQL binaries: initdb is not on PATH and {DEBIAN_PG_BINDIRS}/*/bin is "
            "empty (apt-get install postgresql)")
    return versions[-1]


def _run_as() -> dict[str, object]:
    """Popen arguments that drop root to PG_SERVICE_USER; none when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(PG_SERVICE_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {PG_SERVICE_USER!r} user: PostgreSQL refuses to "
            "run as root") from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def postgres_database(user: str = "mlflow", name: str = "mlflow") -> Iterator[Database]:
    """A fresh PostgreSQL cluster with database `name` owned by a password-protected `user`.

    Clients reach it over TCP with scram-sha-256 as in a real deployment; the superuser only
    over the socket in the cluster's temporary folder.
    """
    bindir, run_as = postgres_bindir(), _run_as()
    root = Path(tempfile.mkdtemp(prefix="fat-mlflow-pg-"))
    log = root / "postgres.log"
    process = None
    try:
        if run_as:
            os.chown(root, run_as["user"], run_as["group"])
        initdb = subprocess.run(
            [bindir / "initdb", "-D", root / "data", "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256", "--no-locale", "--encoding=UTF8"],
            cwd=root, capture_output=True, text=True, **run_as)
        if initdb.returncode:
            raise PostgresUnavailable(f"initdb failed: {initdb.stderr[-2000:]}")
        port = free_port()
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [bindir / "postgres", "-D", root / "data", "-p", str(port), "-k", root,
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                cwd=root, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, **run_as)

        def connect_superuser() -> psycopg2.extensions.connection:
            return psycopg2.connect(host=str(root), port=port, user="postgres",
                                    dbname="postgres", connect_timeout=5)

        def accepting() -> bool:
            try:
                connect_superuser().close()
                return True
            except psycopg2.OperationalError:
                return False

        wait_until(accepting, process, log, "postgres", START_TIMEOUT_S, PostgresUnavailable)
        password = secrets.token_urlsafe(12)
        with contextlib.closing(connect_superuser()) as admin:
            admin.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE ROLE "{user}" LOGIN PASSWORD %s', (password,))
                cursor.execute(f'CREATE DATABASE "{name}" OWNER "{user}"')
        yield Database(user, password, port, name)
    finally:
        if process is not None:
            stop_group(process, signal.SIGINT, STOP_TIMEOUT_S)  # SIGINT: "fast" shutdown
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_tracking_server(backend_store_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """`mlflow server` on `backend_store_uri`, proxying artifacts into `artifacts`; yields its URL.

    One worker: enough for a test's few clients, and the quickest to start.
    """
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
             "--serve-artifacts", "--artifacts-destination", str(artifacts.resolve()),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=log.parent, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # not listening / still starting
            return False

    try:
        wait_until(healthy, process, log, "mlflow server", START_TIMEOUT_S)
        yield url
    finally:
        stop_group(process, signal.SIGTERM, STOP_TIMEOUT_S)
