"""Leader election and fencing for MetaNodes (DESIGN §7) — no home-made consensus.

PostgreSQL: the leader holds a session-level advisory lock on a dedicated connection; when
its process dies the session ends and a standby's ``pg_try_advisory_lock`` succeeds.
SQLite (one host): an exclusive ``flock`` on ``<database>.metanode.lock`` does the same.
The new leader bumps ``leader.epoch`` and writes its address; every leader transaction
re-checks the epoch (``fence``), so a deposed leader that still runs cannot write.
"""

from __future__ import annotations

import fcntl
import os
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from appendfs.store.metanode.schema import leader

#: Advisory lock key: "appendfs" as an integer (any fixed 64-bit value works).
ADVISORY_KEY = 0x617070656E646673 & 0x7FFFFFFFFFFFFFFF


class NotLeader(Exception):
    """This MetaNode no longer leads (its epoch was superseded)."""


class LeaderLock:
    def try_acquire(self) -> bool:
        raise NotImplementedError

    def still_held(self) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class PgAdvisoryLock(LeaderLock):
    def __init__(self, url: sa.engine.URL) -> None:
        self._engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = bool(self._conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar())
        return got

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.DBAPIError:
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sa.exc.DBAPIError:
                pass
            self._conn = None


class FileLock(LeaderLock):
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def make_lock(engine: Engine) -> LeaderLock:
    if engine.dialect.name == "sqlite":
        return FileLock(f"{engine.url.database}.metanode.lock")
    return PgAdvisoryLock(engine.url)


def claim(engine: Engine, address: str) -> int:
    """Become leader: bump the epoch and publish our address. Call with the lock held."""
    with engine.begin() as c:
        c.execute(leader.update().where(leader.c.id == 1).values(
            epoch=leader.c.epoch + 1, address=address, since_ns=time.time_ns()))
        return int(c.execute(sa.select(leader.c.epoch).where(leader.c.id == 1)).scalar_one())


def fence(c: Connection, epoch: int) -> None:
    """Inside a write transaction: prove we still lead (and lock the row against a takeover)."""
    res = c.execute(leader.update().where(leader.c.id == 1, leader.c.epoch == epoch).values(epoch=epoch))
    if res.rowcount != 1:
        raise NotLeader(f"epoch {epoch} was superseded")


def current(engine: Engine) -> tuple[int, str | None]:
    with engine.connect().execution_options(appendfs_read_only=True) as c:
        row = c.execute(sa.select(leader.c.epoch, leader.c.address).where(leader.c.id == 1)).one()
        return int(row.epoch), row.address
