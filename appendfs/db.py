"""SQL engines for the two schemas (namespace in meta/, cluster in store/metanode/).

META_URL is a SQLAlchemy URL: ``sqlite:///path`` (the embedded single-host default) or
``postgresql+psycopg://user@host/db``. This module only builds engines with the durable
defaults of DESIGN §8 and classifies driver errors; it knows no table.

SQLite: WAL, ``synchronous=FULL``, a busy timeout, and ``BEGIN IMMEDIATE`` for every
transaction so writers queue on the database lock instead of failing on upgrade
(several processes share the file under `appendfs up`). PostgreSQL: ``synchronous_commit``
stays on unless the documented option relaxes it.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from appendfs.errors import ConfigError

#: SQLSTATEs after which a whole transaction may simply be retried (never match on text).
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def make_engine(url: str, *, pool_size: int = 5, busy_timeout_s: float = 30.0,
                relaxed_durability: bool = False, pre_ping: bool = True, must_exist: bool = False,
                sqlite_autocheckpoint: bool = True) -> Engine:
    """Create an engine for META_URL with appendfs's durability settings.

    ``sqlite_autocheckpoint=False`` turns off SQLite's checkpoint at commit time (for
    connections whose commits run on an event loop; someone else must checkpoint).

    ``must_exist=True`` (daemons and tools other than `format`) refuses a SQLite path that
    does not exist, instead of creating an empty file that hides a typo.

    ``pre_ping=False`` saves a round trip per checkout for callers that retry on
    :func:`is_unreachable` themselves (appendfs.meta does).
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(f"META_URL {url!r} is not a database URL (sqlite:///PATH or postgresql+psycopg://...)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if must_exist and parsed.database and not os.path.exists(parsed.database):
            raise ConfigError(f"META_URL {url!r}: {parsed.database} does not exist (create it with `appendfs format`)")
        return _sqlite_engine(parsed, busy_timeout_s, relaxed_durability, pool_size, sqlite_autocheckpoint)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args: dict[str, Any] = {"connect_timeout": 10}
        if relaxed_durability:
            connect_args["options"] = "-c synchronous_commit=off"
        return sa.create_engine(parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=pre_ping,
                                connect_args=connect_args)
    raise ConfigError(f"META_URL {url!r}: unsupported database {backend!r} (use sqlite or postgresql)")


def _sqlite_engine(parsed: sa.engine.URL, busy_timeout_s: float, relaxed: bool, pool_size: int,
                   autocheckpoint: bool) -> Engine:
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError("META_URL: an in-memory SQLite database cannot be shared; give sqlite:///PATH")
    engine = sa.create_engine(parsed, connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
                              pool_size=max(pool_size, 8), max_overflow=8)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN IMMEDIATE below
        # is the only BEGIN (pysqlite's implicit BEGIN is DEFERRED and can deadlock writers).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={'NORMAL' if relaxed else 'FULL'}")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        if not autocheckpoint:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Readers that asked for it (execution option appendfs_read_only=True) take a
        # DEFERRED snapshot: in WAL mode they then never wait for or block the writer.
        sql = "BEGIN" if conn.get_execution_options().get("appendfs_read_only") else "BEGIN IMMEDIATE"
        # On the driver's connection: through exec_driver_sql this statement was ~40% of a
        # getattr (SQLAlchemy's execution machinery). Errors are wrapped as SQLAlchemy
        # wraps them, so the runner's busy/retry rules see the same exceptions.
        dbapi_conn = conn.connection.dbapi_connection
        try:
            dbapi_conn.execute(sql)
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, (), exc, sqlite3.Error, dialect=conn.dialect) from exc

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error wrapped by SQLAlchemy, if it has one."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None)


def is_retryable(exc: BaseException) -> bool:
    """True for serialization failures and deadlocks (PostgreSQL) and a busy SQLite."""
    if sqlstate(exc) in RETRYABLE_SQLSTATES:
        return True
    orig = getattr(exc, "orig", None)
    # sqlite3 reports a busy database as OperationalError with error code SQLITE_BUSY (5) or
    # SQLITE_LOCKED (6); the code may be an extended one (SQLITE_BUSY_SNAPSHOT = 517), whose
    # low byte is the primary code.
    code = getattr(orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (5, 6)


def is_unreachable(exc: BaseException) -> bool:
    """True when the database cannot be reached (connection refused, reset, server gone)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc)
    if state is not None:
        return state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return isinstance(exc, sa.exc.OperationalError) and getattr(getattr(exc, "orig", None), "sqlite_errorcode", None) is None
