"""The request and response objects the gateway's operations work with, and header parsing.

:class:`Request` is built by :mod:`appendfs.s3.app` from an ASGI scope: the raw path and
query exactly as received (SigV4 signs them), headers lower-cased, the bucket and key
split from the path (path-style addressing: ``/bucket/key``). :class:`Response` is what
an operation returns; a body is bytes or an async iterator of bytes (streamed GETs).
Pure code: no I/O here.
"""

from __future__ import annotations

import email.utils
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appendfs.meta import s3 as meta_s3
from appendfs.meta.errors import S3Error as MetaS3Error
from appendfs.s3.errors import S3Error

if TYPE_CHECKING:
    from appendfs.s3.body import Body

#: Stored with an object and returned by GET/HEAD (besides x-amz-meta-*).
CONTENT_HEADERS = ("content-type", "content-encoding", "content-disposition", "content-language",
                   "cache-control", "expires")
MAX_KEY_BYTES = 1024
NAME_MAX = 255
MAX_META_BYTES = 2048


@dataclass(eq=False)
class Request:
    method: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    request_id: str
    query: dict[str, str] = field(default_factory=dict)
    h: dict[str, str] = field(default_factory=dict)
    bucket: str | None = None
    key: bytes | None = None
    body: Body = field(init=False)  # set once the request is authenticated

    @classmethod
    def from_scope(cls, scope: dict[str, Any], request_id: str) -> Request:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        req = cls(scope["method"].upper(), raw_path, scope.get("query_string", b""), list(scope["headers"]),
                  request_id)
        for k, v in req.headers:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            req.h[name] = f"{req.h[name]},{value}" if name in req.h else value
        req.query = parse_query(req.query_string)
        req.bucket, req.key = split_path(raw_path)
        return req

    @property
    def resource(self) -> str:
        return self.raw_path.decode("latin-1")


@dataclass(eq=False)
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes | bytearray] = b""

    @classmethod
    def xml(cls, body: bytes, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
        return cls(status, [("content-type", "application/xml"), *(headers or [])], body)


def parse_query(qs: bytes) -> dict[str, str]:
    """``a=1&b&c=%2F`` → {"a": "1", "b": "", "c": "/"} (the last value of a repeated key wins)."""
    out: dict[str, str] = {}
    for part in qs.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        out[urllib.parse.unquote(k.decode("latin-1"))] = urllib.parse.unquote(v.decode("latin-1").replace("+", " "))
    return out


def split_path(raw_path: bytes) -> tuple[str | None, bytes | None]:
    """``/bucket/a/b`` → ("bucket", b"a/b"); ``/bucket`` and ``/bucket/`` → ("bucket", None)."""
    path = raw_path.split(b"?", 1)[0]
    if not path.startswith(b"/"):
        raise S3Error("InvalidRequest", "the request path must start with /")
    rest = path[1:]
    if not rest:
        return None, None
    bucket_raw, slash, key_raw = rest.partition(b"/")
    bucket = urllib.parse.unquote_to_bytes(bucket_raw).decode("utf-8", "replace")
    key = urllib.parse.unquote_to_bytes(key_raw) if slash and key_raw else None
    return bucket, key


def check_bucket_name(name: str) -> None:
    """S3's naming rules for new buckets — the namespace's (:func:`appendfs.meta.s3.check_bucket_name`)."""
    try:
        meta_s3.check_bucket_name(name)
    except MetaS3Error as exc:
        raise S3Error(exc.code, exc.message) from None


def check_key(key: bytes) -> None:
    """Keys the namespace can hold (:func:`appendfs.meta.s3.split_key`: no NUL, no empty,
    ``.`` or ``..`` components), answered with S3's codes: ``KeyTooLongError`` for a key over
    1,024 bytes or a component over 255, ``InvalidArgument`` for the rest."""
    if len(key) > MAX_KEY_BYTES or any(len(p) > NAME_MAX for p in key.split(b"/")):
        raise S3Error("KeyTooLongError", f"keys are at most {MAX_KEY_BYTES} bytes, components {NAME_MAX}")
    try:
        meta_s3.split_key(key)
    except MetaS3Error as exc:
        raise S3Error("InvalidArgument", exc.message) from None


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` → (start, end exclusive), or None when the header is to be ignored
    (not bytes, several ranges). Unsatisfiable → InvalidRange (416)."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise S3Error("InvalidRange", "the requested range is not satisfiable")
            return max(0, size - n), size
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    except ValueError:
        return None
    if start >= size or end <= start:
        raise S3Error("InvalidRange", f"the range {value} is not satisfiable for an object of {size} bytes")
    return start, end


def parse_http_date(value: str) -> int | None:
    """An HTTP date → ns since the epoch, or None when it cannot be parsed (then ignored)."""
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return int(dt.timestamp()) * 1_000_000_000


def stored_headers(h: dict[str, str]) -> dict[str, str]:
    """The content headers and x-amz-meta-* of a PUT (what GET returns later)."""
    out = {k: v for k, v in h.items() if k in CONTENT_HEADERS or k.startswith("x-amz-meta-")}
    size = sum(len(k) + len(v) for k, v in out.items() if k.startswith("x-amz-meta-"))
    if size > MAX_META_BYTES:
        raise S3Error("MetadataTooLarge",
                      f"user metadata is {size} bytes; at most {MAX_META_BYTES} are allowed")
    return out


def quoted(etag: str) -> str:
    return f'"{etag}"'


def etag_matches(header: str, etag: str | None) -> bool:
    """If-Match / If-None-Match: ``*`` (any object) or a list of (quoted, maybe weak) etags,
    compared as the namespace compares them for conditional PUTs."""
    if etag is None:
        return False
    return any(v.strip() == "*" for v in header.split(",")) or meta_s3.etag_listed(header, etag)
