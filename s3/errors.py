"""The gateway's one error type and the one place other layers' errors become S3 errors.

Handlers raise :class:`S3Error` (an S3 error code and a message); every other exception
reaching the HTTP layer goes through :func:`translate`: the namespace's S3 conditions and
POSIX errno, the store's errors, authentication failures. Unknown errors are logged with
their traceback by the caller and answered as ``InternalError`` (500), never as a crash
of the server.
"""

from __future__ import annotations

import errno

import trio

from appendfs.meta import FsError, MetaUnavailable
from appendfs.meta.errors import S3Error as MetaS3Error
from appendfs.s3.sigv4 import AuthError
from appendfs.store.errors import NoSpace, StoreError

#: S3 error code → HTTP status (AWS's table, plus KeyConflict and InsufficientStorage).
STATUS: dict[str, int] = {
    "AccessDenied": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "BadDigest": 400,
    "BucketAlreadyExists": 409,
    "BucketAlreadyOwnedByYou": 409,
    "BucketNotEmpty": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InsufficientStorage": 507,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidChunkSizeError": 400,
    "InvalidDigest": 400,
    "InvalidLocationConstraint": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyConflict": 409,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MaxMessageLengthExceeded": 400,
    "MetadataTooLarge": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "MissingSecurityHeader": 400,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "NotModified": 304,
    "PreconditionFailed": 412,
    "RequestTimeout": 400,
    "RequestTimeTooSkewed": 403,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "XAmzContentSHA256Mismatch": 400,
}

#: Namespace codes that are ours, answered with the S3 code a client understands.
_RENAMED = {"InvalidKey": "InvalidArgument"}


class S3Error(Exception):
    """An S3 error answer: ``code`` (S3's), ``message``, and the HTTP status it implies."""

    def __init__(self, code: str, message: str = "", *, resource: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code
        self.resource = resource

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 400)


def translate(exc: BaseException) -> S3Error | None:
    """The S3 answer for an error from another layer, or None if it is unexpected (→ 500)."""
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, AuthError):
        return S3Error(str(exc.code), exc.message)
    if isinstance(exc, MetaS3Error):
        code = _RENAMED.get(exc.code, exc.code)
        return S3Error(code, exc.message)
    if isinstance(exc, FsError):
        return _from_errno(exc)
    if isinstance(exc, MetaUnavailable):
        return S3Error("ServiceUnavailable", f"the namespace database is unreachable: {exc}")
    if isinstance(exc, NoSpace):
        return S3Error("InsufficientStorage", f"the cluster has no space for new data: {exc}")
    if isinstance(exc, StoreError):
        return S3Error("ServiceUnavailable", f"the store cannot serve this now: {exc}")
    if isinstance(exc, trio.TooSlowError):
        return S3Error("ServiceUnavailable", "the cluster did not answer in time")
    return None


def _from_errno(exc: FsError) -> S3Error:
    e = exc.errno
    if e == errno.ENOENT:
        return S3Error("NoSuchKey", exc.detail or "no such key")
    if e in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY):
        return S3Error("KeyConflict", f"the key conflicts with a file or directory: {exc.detail or exc}")
    if e == errno.ENAMETOOLONG:
        return S3Error("KeyTooLongError", exc.detail or "a key component is longer than 255 bytes")
    if e == errno.ENOSPC:
        return S3Error("InsufficientStorage", str(exc))
    if e in (errno.EACCES, errno.EPERM):
        return S3Error("AccessDenied", str(exc))
    if e == errno.EINVAL:
        return S3Error("InvalidArgument", str(exc))
    return S3Error("InternalError", str(exc))
