"""Object operations: PUT (incl. CopyObject), GET/HEAD with ranges and conditions, DELETE,
DeleteObjects.

A PUT streams the body into an :class:`~appendfs.fs.ObjectWriter` (data first), verifies
every digest the client sent (Content-MD5, x-amz-checksum-*, the signed SHA-256), and
only then commits the key in one namespace transaction with the conditions inside it —
a body that fails a check leaves nothing visible. A GET resolves the object and its
slice map in the namespace and streams extent reads (``read_range``): no open hold,
no copy through a file handle.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from typing import TYPE_CHECKING

from appendfs.meta import PutConditions, S3Bucket, S3Object
from appendfs.meta.errors import S3Error as MetaS3Error
from appendfs.meta.slices import NewSlice, Segment, Slice, resolve
from appendfs.s3 import xml
from appendfs.s3.errors import S3Error
from appendfs.s3.http import (
    CONTENT_HEADERS,
    Request,
    Response,
    check_key,
    etag_matches,
    parse_http_date,
    parse_range,
    quoted,
    stored_headers,
)

if TYPE_CHECKING:
    from appendfs.s3.gateway import Gateway, Principal

EMPTY_MD5 = hashlib.md5(b"").hexdigest()


def put_conditions(h: dict[str, str]) -> PutConditions | None:
    im, inm = h.get("if-match"), h.get("if-none-match")
    if im is None and inm is None:
        return None
    return PutConditions(if_match=im.strip().strip('"') if im else None,
                         if_none_match=inm.strip().strip('"') if inm and inm.strip() != "*" else ("*" if inm else None))


async def put_object(gw: Gateway, req: Request, who: Principal) -> Response:
    if "x-amz-copy-source" in req.h:
        return await copy_object(gw, req, who)
    bucket, key = await gw.bucket_and_key(req, who)
    headers = stored_headers(req.h)
    cond = put_conditions(req.h)
    if key.endswith(b"/"):  # a directory key: no data
        async for data in req.body:
            if data:
                raise S3Error("InvalidArgument", "a key ending in '/' names a directory and takes no data")
        await gw.put(bucket, key, [], 0, who, EMPTY_MD5, headers, cond)
        return Response(200, [("etag", quoted(EMPTY_MD5))])
    gw.check_size(req)
    slices, size = await gw.store_body(req, bucket)
    obj = await gw.put(bucket, key, slices, size, who, req.body.md5_hex, headers, cond)
    return Response(200, [("etag", quoted(obj.etag or req.body.md5_hex)), *req.body.checksum_headers()])


async def _object(gw: Gateway, req: Request, who: Principal) -> tuple[S3Bucket, bytes, S3Object]:
    bucket, key = await gw.bucket_and_key(req, who)
    obj = await gw.read(gw.meta.s3_get_object, bucket.ino, key)
    return bucket, key, obj


def _object_headers(obj: S3Object, etag: str) -> list[tuple[str, str]]:
    out = [("etag", quoted(etag)), ("last-modified", xml.http_time(obj.attr.mtime_ns)), ("accept-ranges", "bytes")]
    if "content-type" not in obj.headers:
        out.append(("content-type", "application/x-directory" if obj.is_dir else "binary/octet-stream"))
    out.extend((k, v) for k, v in obj.headers.items() if k in CONTENT_HEADERS or k.startswith("x-amz-meta-"))
    return out


def check_read_conditions(h: dict[str, str], etag: str, mtime_ns: int, *, prefix: str = "") -> None:
    """RFC 7232 order, as S3 applies it: If-Match, If-Unmodified-Since, If-None-Match,
    If-Modified-Since. ``prefix`` is ``x-amz-copy-source-`` for CopyObject's source."""
    mtime_s = mtime_ns // 1_000_000_000
    im, ius = h.get(prefix + "if-match"), h.get(prefix + "if-unmodified-since")
    inm, ims = h.get(prefix + "if-none-match"), h.get(prefix + "if-modified-since")
    if im is not None:
        if not etag_matches(im, etag):
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold")
    elif ius is not None:
        t = parse_http_date(ius)
        if t is not None and mtime_s > t // 1_000_000_000:
            raise S3Error("PreconditionFailed", "the object was modified since the given date")
    not_modified = "NotModified" if not prefix else "PreconditionFailed"
    if inm is not None:
        if etag_matches(inm, etag):
            raise S3Error(not_modified, "the object matches If-None-Match")
    elif ims is not None:
        t = parse_http_date(ims)
        if t is not None and mtime_s <= t // 1_000_000_000:
            raise S3Error(not_modified, "the object was not modified since the given date")


async def get_object(gw: Gateway, req: Request, who: Principal) -> Response:
    for attempt in range(3):  # a file being written through the mount may change between reads
        try:
            return await _get_object(gw, req, who)
        except S3Error as exc:
            if exc.code != "SlowDown" or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _get_object(gw: Gateway, req: Request, who: Principal) -> Response:
    items: list[Slice] | None = None
    if req.method == "HEAD":
        _, _, obj = await _object(gw, req, who)
    else:  # the object and its slice map in one namespace read
        bucket, key = await gw.bucket_and_key(req, who)
        obj, items = await gw.read(gw.meta.s3_read_object, bucket.ino, key)
    etag = obj.etag or await gw.compute_etag(obj)
    check_read_conditions(req.h, etag, obj.attr.mtime_ns)
    headers = _object_headers(obj, etag)
    size = 0 if obj.is_dir else obj.attr.size
    rng = parse_range(req.h["range"], size) if "range" in req.h and size else None
    if rng is None and "range" in req.h and not size and req.h["range"].strip().lower().startswith("bytes="):
        raise S3Error("InvalidRange", "the requested range is not satisfiable (the object is empty)")
    start, end = rng or (0, size)
    status = 206 if rng else 200
    if rng:
        headers.append(("content-range", f"bytes {start}-{end - 1}/{size}"))
    headers.append(("content-length", str(end - start)))
    for name in ("response-content-type", "response-content-disposition", "response-cache-control",
                 "response-content-encoding", "response-content-language", "response-expires"):
        if name in req.query:
            headers = [(k, v) for k, v in headers if k != name[9:]] + [(name[9:], req.query[name])]
    if req.method == "HEAD" or end == start:
        return Response(status, headers)
    segments = resolve(items, start, end - start) if items is not None else await gw.segments(obj, start, end)
    return Response(status, headers, gw.stream(segments, start, end))


async def delete_object(gw: Gateway, req: Request, who: Principal) -> Response:
    bucket, key = await gw.bucket_and_key(req, who)
    await gw.call(gw.meta.s3_delete_object, bucket.ino, key)
    return Response(204)


async def delete_objects(gw: Gateway, req: Request, who: Principal) -> Response:
    bucket = await gw.bucket(req, who)
    body = await req.body.read_all(gw.cfg.max_xml_bytes)
    if "content-md5" not in req.h and not any(k.startswith("x-amz-checksum-") for k in req.h) \
            and not req.body.has_trailer_checksum:
        raise S3Error("InvalidRequest", "DeleteObjects needs a Content-MD5 or x-amz-checksum-* header")
    quiet, keys = xml.parse_delete(body)
    deleted: list[str] = []
    errors: list[tuple[str, str, str]] = []
    for k in keys:
        raw = k.encode()
        try:
            check_key(raw)
            await gw.call(gw.meta.s3_delete_object, bucket.ino, raw)
            deleted.append(k)
        except (S3Error, MetaS3Error) as exc:
            errors.append((k, exc.code, exc.message))
    return Response.xml(xml.delete_result(deleted, errors, quiet))


def parse_copy_source(value: str) -> tuple[str, bytes]:
    src = urllib.parse.unquote_to_bytes(value.split("?", 1)[0].lstrip("/"))
    bucket, slash, key = src.partition(b"/")
    if not slash or not key or not bucket:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be /BUCKET/KEY")
    check_key(key)
    return bucket.decode("utf-8", "replace"), key


async def copy_source(gw: Gateway, req: Request, who: Principal) -> S3Object:
    name, key = parse_copy_source(req.h["x-amz-copy-source"])
    src_bucket = await gw.bucket_named(name, who)
    obj: S3Object = await gw.call(gw.meta.s3_get_object, src_bucket.ino, key)
    if obj.is_dir:
        raise S3Error("InvalidArgument", "the copy source is a directory")
    etag = obj.etag or await gw.compute_etag(obj)
    check_read_conditions(req.h, etag, obj.attr.mtime_ns, prefix="x-amz-copy-source-")
    return obj


async def copy_object(gw: Gateway, req: Request, who: Principal) -> Response:
    """CopyObject without copying bytes: the new key gets the source's slice map."""
    bucket, key = await gw.bucket_and_key(req, who)
    src = await copy_source(gw, req, who)
    if key.endswith(b"/"):
        raise S3Error("InvalidArgument", "cannot copy onto a directory key")
    directive = req.h.get("x-amz-metadata-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "x-amz-metadata-directive must be COPY or REPLACE")
    headers = stored_headers(req.h) if directive == "REPLACE" else src.headers
    slices = to_slices(await gw.segments(src, 0, src.attr.size), 0)
    etag = src.etag or await gw.compute_etag(src)
    obj = await gw.put(bucket, key, slices, src.attr.size, who, etag, headers, put_conditions(req.h))
    return Response.xml(xml.copy_result("CopyObjectResult", obj.etag or etag, obj.attr.mtime_ns))


def to_slices(segments: list[Segment], base: int) -> list[NewSlice]:
    """Resolved segments → new slices at ``file_off - base``; holes stay holes."""
    return [NewSlice(s.file_off - base, s.length, s.extent_id, s.ext_off) for s in segments
            if s.extent_id is not None and s.length > 0]
