"""Transactions for the namespace: bounded retries, error translation, id batches.

Every namespace operation is one function ``fn(conn) -> result`` run by
:meth:`Runner.run` in exactly one database transaction. The runner

* retries the whole function on SQLSTATE 40001/40P01 and a busy SQLite — decided by
  :func:`appendfs.db.is_retryable`, never by message text — with capped, jittered
  exponential backoff, at most ``MetaConfig.max_attempts`` times;
* retries while the database is unreachable (:func:`appendfs.db.is_unreachable`) until
  ``MetaConfig.unreachable_timeout_s`` has passed, then raises
  :class:`~appendfs.meta.errors.MetaUnavailable`. A connection lost *during COMMIT* is not
  retried (the change may be durable already): it raises
  :class:`~appendfs.meta.errors.CommitOutcomeUnknown`;
* on SQLite, holds one writer lock per database file per process for the whole
  transaction, so threads queue in Python rather than in SQLite's sleeping busy handler
  (other processes still queue on ``BEGIN IMMEDIATE`` and the busy timeout).

:meth:`Runner.run_once` is the other way to run a write, for a caller on an event loop
(SQLite only): one attempt that never waits. Its runner's connections have no busy timeout,
``synchronous=NORMAL`` and no automatic checkpoint, so the commit costs no fsync and no
checkpoint; anything that would wait (this process's writer lock taken, another process's
``BEGIN IMMEDIATE``, a lost race) raises :class:`WouldBlock` and the caller runs the call
the ordinary way in a thread. Such a commit is durable only after :meth:`WalSync.sync`:
the caller must wait for that before it tells anyone the change happened (see
:class:`WalSync`).

Thread safety: a Runner and an IdAllocator may be shared by any number of threads; each
``run`` uses a connection of its own for the whole transaction. Connections are kept by
the Runner between calls (a small LIFO of idle ones) instead of going back to the
engine's pool after every call: a pool checkout plus the AUTOCOMMIT switch of the reader
cost ~45 µs, most of a getattr. A connection that saw a driver error is closed, never
reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from appendfs.db import is_retryable, is_sqlite, is_unreachable
from appendfs.meta import schema
from appendfs.meta.errors import CommitOutcomeUnknown, MetaError, MetaUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Tunables of the namespace client; every default is the durable, safe choice."""

    #: Attempts of one transaction that fails with serialization failure / deadlock / busy.
    max_attempts: int = 30
    #: First backoff after a retryable failure; doubles per attempt up to backoff_max_s.
    backoff_initial_s: float = 0.002
    backoff_max_s: float = 0.25
    #: How long one call keeps retrying while the database is unreachable.
    unreachable_timeout_s: float = 15.0
    #: Inode numbers taken from the counter row per round trip.
    ino_batch: int = 1024
    #: A directory's mtime/ctime is only rewritten by a create/unlink inside it when older
    #: than this; 0 rewrites it every time. Avoids serializing concurrent creates in one
    #: directory on its row lock (JuiceFS's skip-dir-mtime).
    dir_mtime_granularity_ns: int = 100_000_000
    #: Session heartbeat deadline: a session not heard from for this long is dead.
    session_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.ino_batch < 1 or self.unreachable_timeout_s < 0:
            raise ValueError(f"bad MetaConfig {self}")


class Retry(Exception):
    """Raised inside a transaction function: a conditional update lost a race; rerun it."""


class WouldBlock(Exception):
    """:meth:`Runner.run_once` would have had to wait; nothing was changed. Run the call
    again the ordinary way (in a thread)."""


_SQLITE_LOCKS: dict[str, threading.Lock] = {}
_SQLITE_LOCKS_GUARD = threading.Lock()


def _sqlite_lock(engine: Engine) -> threading.Lock:
    key = str(engine.url.database)
    with _SQLITE_LOCKS_GUARD:
        return _SQLITE_LOCKS.setdefault(key, threading.Lock())


class Runner:
    """Runs transaction functions with the retry and translation rules above."""

    def __init__(self, engine: Engine, config: MetaConfig, *, writer: bool = True) -> None:
        self.engine = engine
        self.config = config
        self.sqlite = is_sqlite(engine)
        self._lock = _sqlite_lock(engine) if self.sqlite and writer else None
        # Idle connections kept for the next call; at most half the pool's base size, so a
        # reader and a writer Runner on one engine never hold more than the pool keeps.
        pool_size = getattr(engine.pool, "size", lambda: 2)()
        self._idle_max = max(1, int(pool_size) // 2)
        self._idle: list[sa.Connection] = []
        self._idle_lock = threading.Lock()

    def _checkout(self) -> sa.Connection:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        return self.engine.connect()

    def _checkin(self, conn: sa.Connection) -> None:
        if not conn.invalidated and not conn.closed:
            with self._idle_lock:
                if len(self._idle) < self._idle_max:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        """Return the idle connections to the engine's pool (before ``engine.dispose()``)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextlib.contextmanager
    def _writer(self, what: str) -> Iterator[None]:
        if self._lock is None:
            yield
        else:
            # Bounded like every wait on the database: a thread ahead of us may be stuck in
            # SQLite's busy handler behind another process's lock.
            if not self._lock.acquire(timeout=self.config.unreachable_timeout_s):
                raise MetaUnavailable(f"{what}: this process's SQLite writer lock was not free for "
                                      f"{self.config.unreachable_timeout_s:g}s (database busy)")
            try:
                yield
            finally:
                self._lock.release()

    def run(self, fn: Callable[[sa.Connection], T], what: str) -> T:
        cfg = self.config
        attempt = 0
        deadline: float | None = None
        busy_deadline: float | None = None
        while True:
            attempt += 1
            committing = False
            started = time.monotonic()
            try:
                with self._writer(what):
                    conn = self._checkout()
                    try:
                        with conn.begin():
                            result = fn(conn)
                            committing = True
                    except (Retry, MetaError):
                        self._checkin(conn)  # raised on purpose, rolled back cleanly: reusable
                        raise
                    except BaseException:
                        conn.close()  # a driver error or worse: never reuse
                        raise
                    self._checkin(conn)
                return result
            except Retry:
                if attempt >= cfg.max_attempts:
                    raise MetaUnavailable(
                        f"{what}: gave up after {attempt} conflicting attempts"
                    ) from None
            except sa.exc.DBAPIError as exc:
                if committing and is_unreachable(exc):
                    raise CommitOutcomeUnknown(
                        f"{what}: lost the metadata database during COMMIT; the change may or "
                        f"may not be applied ({type(exc.orig).__name__})"
                    ) from exc
                if is_retryable(exc):
                    # A busy SQLite has already waited its busy timeout in each attempt:
                    # the time budget, not only the attempt count, bounds the retries.
                    if busy_deadline is None:
                        busy_deadline = started + cfg.unreachable_timeout_s
                    if attempt >= cfg.max_attempts or time.monotonic() >= busy_deadline:
                        raise MetaUnavailable(
                            f"{what}: gave up after {attempt} attempts "
                            f"(serialization failures / deadlocks / database busy)"
                        ) from exc
                elif is_unreachable(exc):
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + cfg.unreachable_timeout_s
                        log.warning(
                            "%s: metadata database unreachable, retrying: %s", what, exc.orig
                        )
                    if now >= deadline:
                        raise MetaUnavailable(
                            f"{what}: metadata database {self.engine.url.render_as_string()} "
                            f"unreachable for {cfg.unreachable_timeout_s:g}s "
                            f"({type(exc.orig).__name__}: {str(exc.orig).strip()[:200]})"
                        ) from exc
                else:
                    raise
            delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * (2 ** min(attempt, 16)))
            time.sleep(delay * (0.5 + random.random() / 2))


    def run_once(self, fn: Callable[[sa.Connection], T], what: str) -> T:
        """One attempt of ``fn`` that never waits (see the module docstring); raises
        :class:`WouldBlock` instead of waiting or retrying. The caller must make the commit
        durable (:meth:`WalSync.sync`) before acting on it."""
        if self._lock is None or not self._lock.acquire(blocking=False):
            raise WouldBlock(what)
        try:
            conn = self._checkout()
            committing = False
            try:
                with conn.begin():
                    result = fn(conn)
                    committing = True
            except Retry:
                self._checkin(conn)
                raise WouldBlock(what) from None
            except MetaError:
                self._checkin(conn)
                raise
            except sa.exc.DBAPIError as exc:
                conn.close()
                if committing and is_unreachable(exc):
                    raise CommitOutcomeUnknown(
                        f"{what}: the metadata database failed during COMMIT; the change may or "
                        f"may not be applied ({type(exc.orig).__name__})"
                    ) from exc
                if is_retryable(exc) or is_unreachable(exc):
                    raise WouldBlock(what) from exc  # busy elsewhere, or an error the thread path retries
                raise
            except BaseException:
                conn.close()
                raise
            self._checkin(conn)
            return result
        finally:
            self._lock.release()


class WalSync:
    """Makes the commits of a ``synchronous=NORMAL`` SQLite connection durable.

    In WAL mode ``synchronous=FULL`` means: fsync the WAL at every commit. NORMAL skips that
    fsync (checkpoints still sync). A commit followed by an fdatasync of the WAL file
    before anyone is told about it is therefore as durable as a FULL commit (DESIGN §8);
    the difference is that other connections may see it a moment before it is durable,
    as on a local filesystem before its journal commit. Because the WAL is one sequential
    file, one fdatasync covers every commit before it: waiters share syncs (group commit).

    Thread-safe. ``committed`` counts the NORMAL commits; :meth:`sync` (blocking, for a
    worker thread) makes all commits counted so far durable. A failed fsync is final: the
    kernel may have dropped the dirty pages, so every later sync raises too.
    """

    def __init__(self, db_path: str) -> None:
        self.wal_path = f"{db_path}-wal"
        self.committed = 0
        self.synced = 0
        self.syncs = 0
        self._lock = threading.Lock()
        self._broken: OSError | None = None

    def note_commit(self) -> int:
        """Count one NORMAL commit; returns its number, for :meth:`sync` and ``synced``."""
        self.committed += 1  # only ever called by the one thread that runs run_once commits
        return self.committed

    def sync(self) -> None:
        """fdatasync the WAL, making every commit counted before the call durable."""
        with self._lock:
            if self._broken is not None:
                raise MetaUnavailable(f"the namespace WAL {self.wal_path} could not be synced earlier "
                                      f"({self._broken}); restart this client") from self._broken
            target = self.committed
            if self.synced >= target:
                return
            try:
                fd = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # checkpointed into the (synced) database and removed
                self.synced = target
                return
            try:
                os.fdatasync(fd)
            except OSError as exc:
                self._broken = exc
                raise MetaUnavailable(f"fdatasync of the namespace WAL {self.wal_path} failed: {exc}") from exc
            finally:
                os.close(fd)
            self.synced = target
            self.syncs += 1


class IdAllocator:
    """Hands out ids from a ``counter`` row in batches (one short transaction per batch)."""

    def __init__(self, runner: Runner, name: str, batch: int) -> None:
        self._runner = runner
        self._name = name
        self._batch = batch
        self._lock = threading.Lock()
        self._next = 0
        self._end = 0
        self._returned: list[int] = []

    def _take(self, conn: sa.Connection) -> int:
        c = schema.counter
        row = conn.execute(
            c.update()
            .where(c.c.name == self._name)
            .values(value=c.c.value + self._batch)
            .returning(c.c.value)
        ).one()
        return int(row.value)

    def next(self, *, wait: bool = True) -> int:
        """The next id; with ``wait=False`` (on an event loop) :class:`WouldBlock` instead
        of waiting for the lock or running the refill transaction."""
        if not self._lock.acquire(blocking=wait):
            raise WouldBlock(f"allocate {self._name}")
        try:
            if self._returned:
                return self._returned.pop()
            if self._next >= self._end:
                if not wait:
                    raise WouldBlock(f"allocate {self._name}")
                end = self._runner.run(self._take, f"allocate {self._name}")
                self._next, self._end = end - self._batch, end
            value = self._next
            self._next += 1
            return value
        finally:
            self._lock.release()

    def give_back(self, ids: Sequence[int]) -> None:
        """Return ids taken by :meth:`next` that no committed transaction used.

        For transactions that take ids before they know how many they need (an S3 PUT
        creating the missing directories of its key). Never pass ids of a transaction whose
        outcome is unknown (:class:`CommitOutcomeUnknown`): they may be in use.
        """
        with self._lock:
            self._returned.extend(ids)
