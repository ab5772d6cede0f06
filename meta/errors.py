"""The namespace's exception tree (a subtree of :class:`appendfs.errors.AppendfsError`).

Every error the namespace raises on purpose is a :class:`MetaError`. Two kinds matter to
callers:

* :class:`FsError` carries a POSIX ``errno`` (ENOENT, EEXIST, ENOTEMPTY …); it is
  permanent for the given call and the mount maps it to that errno in one place.
* :class:`MetaUnavailable` is temporary: the database could not be reached (or kept
  refusing with serialization failures) within the bounded retry budget. Nothing was
  applied — except for :class:`CommitOutcomeUnknown`, raised when the connection died
  while the COMMIT itself was in flight, so the change may or may not be durable. The
  mount turns both into EIO.

SQLAlchemy and driver exceptions never leave :mod:`appendfs.meta`; they are translated
here (see :mod:`appendfs.meta.txn`).
"""

from __future__ import annotations

import errno as _errno
import os

from appendfs.errors import AppendfsError


class MetaError(AppendfsError):
    """Base of every error raised on purpose by the namespace layer."""


class FsError(MetaError):
    """A POSIX error: ``errno`` says which; the call changed nothing."""

    def __init__(self, errno: int, detail: str = "") -> None:
        name = _errno.errorcode.get(errno, str(errno))
        text = f"[{name}] {os.strerror(errno)}"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.errno = errno
        self.detail = detail


class MetaUnavailable(MetaError):
    """The metadata database is unreachable or overloaded; retry later (EIO at the mount)."""

    temporary = True


class CommitOutcomeUnknown(MetaUnavailable):
    """The connection broke during COMMIT: the change may or may not have been applied."""


class SessionExpired(MetaError):
    """This client's session was declared dead (missed heartbeats) and cleaned up."""


class Corrupt(MetaError):
    """The namespace violates an invariant it should never violate (fsck material)."""


def enoent(detail: str = "") -> FsError:
    return FsError(_errno.ENOENT, detail)
