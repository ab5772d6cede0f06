"""Hot-path statements: SQLAlchemy Core built once, compiled once per dialect, run on the cursor.

The namespace's hottest calls (getattr, lookup, readdir, create) spend most of their time
not in the database but in building statements and in SQLAlchemy's per-execution
machinery (result metadata, events, row objects): about 0.2 ms per statement against a
0.07 ms loopback round trip (see docs/benchmarks.md, "Namespace"). A :class:`Stmt` is a
Core statement with named ``bindparam``\\ s, compiled for a dialect the first time it is
used there; :meth:`Stmt.rows` then runs the compiled SQL on the DBAPI cursor of the
SQLAlchemy connection the caller already holds, inside the caller's transaction, and
returns plain tuples.

Rules that keep this safe:

* Only for statements whose bound values and result columns need no type processing:
  integers, ``bytes`` and ``str`` (plain text columns), which both drivers take and
  return as they are (so no :class:`~appendfs.meta.schema.U64` column). Expanding
  (``IN``) parameters are refused.
* Driver errors are wrapped exactly as SQLAlchemy wraps them (``DBAPIError.instance``),
  and a disconnect invalidates the connection, so :mod:`appendfs.meta.txn`'s retry and
  error rules (:func:`appendfs.db.is_retryable`, :func:`appendfs.db.is_unreachable`) see
  the same exceptions as for any other statement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

Builder = Callable[[str], ClauseElement]
#: (SQL text, parameter names in order for positional paramstyles, fixed parameter values)
_Compiled = tuple[str, tuple[str, ...] | None, dict[str, Any]]


class Stmt:
    """A statement built per dialect name by ``build``, compiled once per dialect."""

    def __init__(self, build: Builder) -> None:
        self._build = build
        self._compiled: dict[str, _Compiled] = {}
        self._lock = threading.Lock()

    def _compile(self, dialect: Dialect) -> _Compiled:
        with self._lock:
            found = self._compiled.get(dialect.name)
            if found is not None:
                return found
            c = cast(SQLCompiler, self._build(dialect.name).compile(dialect=dialect))
            if c.literal_execute_params or c.post_compile_params:
                raise ValueError(f"Stmt cannot run expanding parameters: {c.string}")
            order = tuple(c.positiontup or ()) if dialect.positional else None
            # Values fixed in the statement itself (the 1 of ``gen + 1``) are parameters too.
            fixed = {
                key: bp.value
                for key, bp in ((c.bind_names[b], b) for b in c.binds.values())
                if not bp.required and bp.value is not None
            }
            found = (c.string, order, fixed)
            self._compiled[dialect.name] = found
            return found

    def _execute(self, conn: sa.Connection, params: Mapping[str, Any]) -> Any:
        dialect = conn.dialect
        sql, order, fixed = self._compiled.get(dialect.name) or self._compile(dialect)
        if fixed:
            params = {**fixed, **params}
        args: Any = params if order is None else tuple(params[k] for k in order)
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        cur: Any = dbapi_conn.cursor()  # the driver's own cursor (psycopg takes binary=)
        try:
            if dialect.driver == "psycopg":
                # Binary results: psycopg parses 10,000 readdir rows in half the time.
                cur.execute(sql, args, binary=True)
            else:
                cur.execute(sql, args)
        except Exception as exc:
            cur.close()
            raise _wrap(conn, exc, sql, args, dbapi_conn) from exc
        return cur

    def rows(self, conn: sa.Connection, **params: Any) -> list[tuple[Any, ...]]:
        """All result rows as tuples (the statement must return rows)."""
        cur = self._execute(conn, params)
        try:
            return list(cur.fetchall())
        except Exception as exc:
            raise _wrap(conn, exc, "fetch", params, conn.connection.dbapi_connection) from exc
        finally:
            cur.close()

    def first(self, conn: sa.Connection, **params: Any) -> tuple[Any, ...] | None:
        rows = self.rows(conn, **params)
        return rows[0] if rows else None

    def rowcount(self, conn: sa.Connection, **params: Any) -> int:
        """Rows changed by a DML statement without RETURNING."""
        cur = self._execute(conn, params)
        try:
            return int(cur.rowcount)
        finally:
            cur.close()


def _wrap(conn: sa.Connection, exc: Exception, sql: str, args: Any, dbapi_conn: Any) -> Exception:
    """``exc`` as SQLAlchemy would raise it, invalidating the connection on a disconnect."""
    dialect = conn.dialect
    dbapi = dialect.loaded_dbapi
    if not isinstance(exc, dbapi.Error):
        return exc
    lost = bool(dialect.is_disconnect(exc, dbapi_conn, None))
    if lost and not conn.invalidated:
        conn.invalidate(exc)
    wrapped = sa.exc.DBAPIError.instance(
        sql, args, exc, dbapi.Error, connection_invalidated=lost, dialect=dialect
    )
    return wrapped
