"""The namespace's exception tree (a subtree of :class:`appendfs.errors.AppendfsError`).

Every error the namespace raises on purpose is a :class:`MetaError`. Two kinds matter to
callers:

* :class:`FsError` carries a POSIX ``errno`` (ENOENT, EEXIST, ENOTEMPTY …); it is
  permanent for the given call and the mount maps it to that errno in one place.
* :class:`S3Error` carries an S3 error ``code`` (NoSuchKey, BucketNotEmpty …) for the
  conditions of the S3 transactions (:mod:`appendfs.meta.s3`); it is permanent for the
  call, except ``EtagUnknown``, which asks the gateway to compute an ETag and call again.
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


class S3Error(MetaError):
    """An S3 condition: ``code`` is the S3 error code the gateway answers with.

    Codes raised: NoSuchBucket, BucketAlreadyExists, BucketAlreadyOwnedByYou,
    BucketNotEmpty, InvalidBucketName, NoSuchKey, NoSuchUpload, InvalidPart,
    InvalidPartOrder, EntityTooSmall, MalformedXML, PreconditionFailed, MetadataTooLarge,
    InvalidArgument, and two of ours: ``KeyConflict`` (a key would turn a file into a
    directory or the reverse; HTTP 409) and ``InvalidKey`` (a key no path can represent).
    ``EtagUnknown`` is not an answer: a condition needs the ETag of the existing object
    ``ino``, which is unknown for its current generation; compute and store it
    (:meth:`~appendfs.meta.Meta.s3_set_etag`), then call again. The call changed nothing.
    """

    def __init__(self, code: str, message: str = "", *, ino: int | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code
        #: The inode a condition needs the ETag of (``EtagUnknown`` only).
        self.ino = ino


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
