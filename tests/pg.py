"""A throwaway PostgreSQL cluster for tests: ``initdb`` into a temp dir, ``pg_ctl start`` on a free port.

No system service, no network beyond 127.0.0.1, trust authentication on loopback, ``fsync=off``.
PostgreSQL refuses to run as root, so as root the tools run as the ``postgres`` user (``runuser``).
If PostgreSQL is not installed the tests FAIL (they are not skipped): ``apt-get install postgresql``.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

__all__ = ["PostgresCluster", "PostgresUnavailable", "create_database", "find_pg_bin", "truncate_tables"]

INSTALL_HINT = "apt-get install postgresql"
# A server time zone far from UTC: day buckets and "today" windows must not depend on it.
SERVER_TIMEZONE = "Pacific/Kiritimati"
# Where distributions put versioned PostgreSQL binaries when they are not on PATH (Debian/Ubuntu).
PG_LIB_DIRS = ("/usr/lib/postgresql",)


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed or the cluster could not start."""


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$PATH`` first, then ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        (p for root in PG_LIB_DIRS for p in glob.glob(f"{root}/*/bin/initdb")),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
        reverse=True,
    )
    for initdb in candidates:
        folder = Path(initdb).parent
        if (folder / "pg_ctl").is_file():
            return folder
    raise PostgresUnavailable(
        "PostgreSQL is not installed: no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin. "
        f"Install it with `{INSTALL_HINT}` (.ci/run does this; the system service need not run)."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """``with PostgresCluster() as pg: pg.url("db")`` — started on enter, stopped and deleted on exit."""

    def __init__(self) -> None:
        self.bin = find_pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="minigpt4-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.port = 0
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root but there is no 'postgres' user to run PostgreSQL as ({INSTALL_HINT} creates it)"
                ) from None
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root and `runuser` (util-linux) is missing")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self.sockets.mkdir()
        if self._as_postgres:
            os.chown(self.sockets, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as_postgres, str(self.bin / tool), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""
            raise PostgresUnavailable(
                f"`{' '.join(cmd)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}{log}"
            )
        return result

    def start(self) -> PostgresCluster:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        last: Exception | None = None
        for _ in range(5):  # another process may grab the free port between bind and start
            self.port = _free_port()
            try:
                self.start_server()
                return self
            except PostgresUnavailable as exc:
                last = exc
        raise PostgresUnavailable(f"PostgreSQL did not start: {last}")

    # Fault injection (tests/fault): stop and start the server process, keeping the data and the port.

    def start_server(self) -> None:
        """Start the (stopped) server on :attr:`port` and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            f"-c TimeZone={SERVER_TIMEZONE}"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data: ``fast`` ends every session (an orderly outage),
        ``immediate`` kills the processes (a crash; recovery replays the WAL on the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60)

    def restart_server(self, down_s: float = 0.0, mode: str = "fast") -> None:
        """Stop the server, stay down ``down_s`` seconds, start it again (same port, same data)."""
        self.stop_server(mode)
        if down_s:
            time.sleep(down_s)
        self.start_server()

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        try:
            if self.running:
                self.stop_server("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    @classmethod
    def launch(cls) -> PostgresCluster:
        """A started cluster; on failure everything is removed again and :class:`PostgresUnavailable` raised."""
        cluster = cls()
        try:
            return cluster.start()
        except BaseException:
            cluster.stop()
            raise

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (a copy of ``template`` if given) on the server of ``server_url``; its URL."""
    base, _, _ = server_url.rpartition("/")

    async def create() -> None:
        conn = await asyncpg.connect(base.replace("postgresql+asyncpg://", "postgresql://") + "/postgres")
        try:
            sql = f'CREATE DATABASE "{name}"'
            if template:
                sql += f' TEMPLATE "{template}"'
                if conn.get_server_version().major >= 15:
                    sql += " STRATEGY FILE_COPY"  # faster than WAL_LOG for tiny databases
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{base}/{name}"


def truncate_tables(url: str, tables: list[str]) -> None:
    """Empty ``tables`` (ids restart at 1, as in a new database)."""

    async def truncate() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    asyncio.run(truncate())


def create_schema(url: str) -> None:
    """Create the models' tables in the database at ``url`` (tests; production uses migrations)."""
    import asyncio

    from storage import Database

    async def create() -> None:
        db = Database(url)
        try:
            await db.create_all()
        finally:
            await db.dispose()

    asyncio.run(create())
