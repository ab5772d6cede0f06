"""The one place where exceptions become errno values (DESIGN §4).

Every FUSE handler in :mod:`appendfs.mount.ops` is wrapped by :func:`fuse_errors`: an
exception that escaped a pyfuse3 handler would end the whole mount (ENOTCONN for every
process), so each one is turned into a ``FUSEError(errno)`` here:

=====================================  =======================================
FsError (namespace)                    its own errno (ENOENT, EEXIST, ENOTEMPTY…)
MetaUnavailable / CommitOutcomeUnknown EIO  (database unreachable past its budget)
SessionExpired                         EIO  (this client was declared dead; it renews)
NoSpace (store)                        ENOSPC
Unavailable / Unreadable / StoreError  EIO  (not enough DataNodes, no good replica)
trio.TooSlowError                      EIO
OSError with an errno                  that errno
anything else                          EIO, logged with its traceback
=====================================  =======================================

Cancellation (trio.Cancelled, KeyboardInterrupt) is never converted: it ends the handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from appendfs.meta import FsError, MetaUnavailable, SessionExpired
from appendfs.store.errors import NoSpace, StoreError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_of(exc: BaseException, where: str = "") -> int:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, SessionExpired):
        log.warning("%s: %s", where, exc)
        return errno.EIO
    if isinstance(exc, MetaUnavailable):
        log.warning("%s: namespace unavailable: %s", where, exc)
        return errno.EIO
    if isinstance(exc, NoSpace):
        return errno.ENOSPC
    if isinstance(exc, StoreError):
        log.warning("%s: store: %s", where, exc)
        return errno.EIO
    if isinstance(exc, trio.TooSlowError):
        log.warning("%s: timed out", where)
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return errno_of(exc.exceptions[0], where)
    log.error("%s: unexpected error, answering EIO", where, exc_info=exc)
    return errno.EIO


def fuse_errors(fn: F) -> F:
    """Wrap a pyfuse3 handler so every error leaves it as a FUSEError (never kills the mount).

    Being the one place every request passes through, it also records each request in the
    handler's ``op_stats`` (:class:`~appendfs.mount.opstats.OpStats`): operation, time taken
    and the errno answered, with a warning in the log for a slow one (the mount's
    ``slow_request_s``). A cancelled request (unmount) is not recorded."""
    where = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        err, cancelled = 0, False
        try:
            return await fn(self, *args, **kw)
        except pyfuse3.FUSEError as exc:
            err = exc.errno
            raise
        except trio.Cancelled:
            cancelled = True
            raise
        except Exception as exc:
            err = errno_of(exc, where)
            raise pyfuse3.FUSEError(err) from None
        except BaseExceptionGroup as group:
            if group.subgroup(trio.Cancelled) is not None:
                cancelled = True
                raise
            err = errno_of(group, where)
            raise pyfuse3.FUSEError(err) from None
        finally:
            if not cancelled:
                took = time.perf_counter() - t0
                if self.op_stats.record(where, took, err):
                    log.warning("slow FUSE request: %s%s took %.3f s%s", where, _brief(args), took,
                                f" and failed with {errno.errorcode.get(err, err)}" if err else "")

    return wrapper  # type: ignore[return-value]


def _brief(args: tuple[Any, ...]) -> str:
    """The leading numbers of a request (inode or handle, offset, size) for a log line;
    never names or data, which may be private."""
    return "(" + ", ".join(str(a) for a in args[:3] if isinstance(a, int)) + ")"
