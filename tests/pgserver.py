"""A throwaway PostgreSQL server for the test suite (and bench/), started as `postgres`.

When ``APPENDFS_TEST_PG`` is set (a URL of a server where we may CREATE DATABASE), it is
used as is. Otherwise :class:`ThrowawayPostgres` runs initdb in a private temporary
directory, starts postgres on a free loopback port, and removes everything on stop.
initdb and postgres refuse to run as root, so as root they run as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import sqlalchemy as sa


def _pg_bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    return os.path.dirname(found[-1])


def _free_port() -> int:
    from appendfs.up import free_port  # below the ephemeral range: see its docstring

    return free_port()


class ThrowawayPostgres:
    """``durable=False`` runs the server with ``fsync=off``: commits still happen, in the
    same order, and survive anything but a crash of this machine's kernel — which no test
    causes (outage tests stop and start the server, or pause it). The test suite uses it;
    benchmarks keep the default, a server as durable as a production one."""

    def __init__(self, *, durable: bool = True) -> None:
        self.durable = durable
        self.bindir = _pg_bindir()
        self.dir = tempfile.mkdtemp(prefix="appendfs-pg-")
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_root = os.geteuid() == 0

    def _run_as_owner(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]

    def start(self) -> str:
        data = os.path.join(self.dir, "data")
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run_as_owner([f"{self.bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"])
        argv = [f"{self.bindir}/postgres", "-D", data, "-p", str(self.port), "-h", "127.0.0.1",
                "-k", self.dir, "-c", "max_connections=300", "-c", "shared_buffers=256MB",
                "-c", f"fsync={'on' if self.durable else 'off'}", "-c", "synchronous_commit=on"]
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        self.log = open(os.path.join(self.dir, "postgres.log"), "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        url = self.admin_url
        deadline = time.monotonic() + 60
        while True:
            try:
                eng = sa.create_engine(url)
                with eng.connect():
                    pass
                eng.dispose()
                return url
            except sa.exc.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"throwaway postgres did not start; see {self.dir}/postgres.log") from None
                time.sleep(0.2)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM = smart shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _signal_postmaster(self, signum: int) -> None:
        """Signal postgres itself: runuser, its parent when we are root, does not forward SIGINT."""
        pidfile = os.path.join(self.dir, "data", "postmaster.pid")
        with open(pidfile) as f:
            os.kill(int(f.readline()), signum)

    def pause(self) -> None:
        """Stop the server (fast shutdown) but keep its data, for outage tests."""
        assert self.proc is not None
        self._signal_postmaster(signal.SIGINT)  # fast shutdown: clients are disconnected
        self.proc.wait(60)

    def resume(self) -> None:
        argv = self.proc.args if self.proc is not None else None
        assert argv is not None
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                eng = sa.create_engine(self.admin_url)
                with eng.connect():
                    pass
                eng.dispose()
                return
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def create_database(admin_url: str, prefix: str = "t") -> str:
    """Create a fresh database on the server of ``admin_url``; return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng.dispose()
    return str(sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False))


def drop_database(admin_url: str, url: str) -> None:
    name = sa.engine.make_url(url).database
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    eng.dispose()


@contextlib.contextmanager
def postgres_server(*, durable: bool = True) -> Iterator[tuple[str, ThrowawayPostgres | None]]:
    """Yield (admin URL, the throwaway server or None when APPENDFS_TEST_PG is given)."""
    given = os.environ.get("APPENDFS_TEST_PG")
    if given:
        yield given, None
        return
    server = ThrowawayPostgres(durable=durable)
    try:
        yield server.start(), server
    finally:
        server.stop()
