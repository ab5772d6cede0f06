"""Multipart uploads: Create, UploadPart (and UploadPartCopy), Complete, Abort, ListParts,
ListMultipartUploads.

Parts are written to ``s3-part`` streams and recorded with their slice maps in the
namespace (``s3_part_slice``); Complete concatenates those maps into the object's slices
in one transaction, without copying a byte (DESIGN §5). UploadPartCopy takes the part's
map from the source object's slices too; its ETag (the MD5 of the range) is computed by
reading the range once.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from appendfs.meta import S3Bucket, S3Upload
from appendfs.s3 import xml
from appendfs.s3.errors import S3Error
from appendfs.s3.http import Request, Response, parse_range, quoted, stored_headers
from appendfs.s3.objects import copy_source, put_conditions, to_slices

if TYPE_CHECKING:
    from appendfs.s3.gateway import Gateway, Principal

MAX_PARTS = 10_000


async def create(gw: Gateway, req: Request, who: Principal) -> Response:
    bucket, key = await gw.bucket_and_key(req, who)
    if key.endswith(b"/"):
        raise S3Error("InvalidArgument", "a directory key cannot be uploaded in parts")
    up: S3Upload = await gw.call(gw.meta.s3_upload_create, bucket.name, key, stored_headers(req.h))
    return Response.xml(xml.initiate_multipart(bucket.name, key, up.upload_id))


async def _upload(gw: Gateway, req: Request, who: Principal) -> tuple[S3Bucket, S3Upload, bytes]:
    bucket, key = await gw.bucket_and_key(req, who)
    up: S3Upload = await gw.call(gw.meta.s3_upload, req.query["uploadId"])
    if up.bucket != bucket.name or up.key != key:
        raise S3Error("NoSuchUpload", "the upload id belongs to another key")
    return bucket, up, key


def _part_number(req: Request) -> int:
    raw = req.query.get("partNumber", "")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PARTS:
        raise S3Error("InvalidArgument", f"partNumber must be an integer from 1 to {MAX_PARTS}")
    return int(raw)


async def upload_part(gw: Gateway, req: Request, who: Principal) -> Response:
    number = _part_number(req)
    bucket, up, _ = await _upload(gw, req, who)
    if "x-amz-copy-source" in req.h:
        return await _upload_part_copy(gw, req, who, up, number)
    gw.check_size(req)
    slices, size = await gw.store_body(req, bucket, part=True)
    etag = req.body.md5_hex
    await gw.call(gw.meta.s3_part_put, up.upload_id, number, size, etag, slices)
    return Response(200, [("etag", quoted(etag)), *req.body.checksum_headers()])


async def _upload_part_copy(gw: Gateway, req: Request, who: Principal, up: S3Upload, number: int) -> Response:
    src = await copy_source(gw, req, who)
    size = src.attr.size
    start, end = 0, size
    if "x-amz-copy-source-range" in req.h:
        rng = parse_range(req.h["x-amz-copy-source-range"], size)
        if rng is None:
            raise S3Error("InvalidArgument", "x-amz-copy-source-range must be bytes=FIRST-LAST")
        start, end = rng
    segments = await gw.segments(src, start, end)
    md5 = hashlib.md5()
    async for data in gw.stream(segments, start, end):
        md5.update(data)
    if any(s.extent_id is None for s in segments):
        raise S3Error("NotImplemented", "copying a range with holes (a sparse file) into a part is not supported")
    etag = md5.hexdigest()
    await gw.call(gw.meta.s3_part_put, up.upload_id, number, end - start, etag, to_slices(segments, start))
    return Response.xml(xml.copy_result("CopyPartResult", etag, src.attr.mtime_ns))


async def complete(gw: Gateway, req: Request, who: Principal) -> Response:
    bucket, up, key = await _upload(gw, req, who)
    parts = xml.parse_complete(await req.body.read_all(gw.cfg.max_xml_bytes))
    if len(parts) > MAX_PARTS:
        raise S3Error("InvalidArgument", f"at most {MAX_PARTS} parts")
    t = who.tenant
    obj = await gw.call(gw.meta.s3_upload_complete, up.upload_id, parts, min_part_bytes=gw.cfg.min_part_bytes,
                        uid=t.uid, gid=t.gid, file_mode=t.file_mode, dir_mode=t.dir_mode,
                        inherit_xattrs=gw.inherit, cond=put_conditions(req.h))
    location = f"/{bucket.name}/{key.decode('utf-8', 'replace')}"
    return Response.xml(xml.complete_multipart(location, bucket.name, key, obj.etag or ""))


async def abort(gw: Gateway, req: Request, who: Principal) -> Response:
    _, up, _ = await _upload(gw, req, who)
    await gw.call(gw.meta.s3_upload_abort, up.upload_id)
    return Response(204)


def _int(req: Request, name: str, default: int, hi: int) -> int:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return min(int(raw), hi)


async def list_parts(gw: Gateway, req: Request, who: Principal) -> Response:
    _, up, key = await _upload(gw, req, who)
    marker = _int(req, "part-number-marker", 0, MAX_PARTS)
    max_parts = _int(req, "max-parts", 1000, 1000)
    parts, truncated = await gw.call(gw.meta.s3_parts, up.upload_id, marker, max_parts)
    nxt = parts[-1].part_number if parts else marker
    return Response.xml(xml.list_parts(
        bucket=up.bucket, key=key, upload_id=up.upload_id, marker=marker, next_marker=nxt, max_parts=max_parts,
        truncated=truncated, parts=[(p.part_number, p.size, p.created_ns, p.etag) for p in parts],
        owner=who.access_key))


async def list_uploads(gw: Gateway, req: Request, who: Principal) -> Response:
    bucket = await gw.bucket(req, who)
    prefix = req.query.get("prefix", "").encode()
    key_marker = req.query.get("key-marker", "").encode()
    id_marker = req.query.get("upload-id-marker", "")
    max_uploads = _int(req, "max-uploads", 1000, 1000)
    ups, truncated = await gw.call(gw.meta.s3_uploads, bucket.name, prefix, key_marker or None, id_marker or None,
                                   max_uploads)
    return Response.xml(xml.list_uploads(
        bucket=bucket.name, prefix=prefix, key_marker=key_marker, upload_id_marker=id_marker,
        max_uploads=max_uploads, truncated=truncated, uploads=[(u.key, u.upload_id, u.initiated_ns) for u in ups],
        owner=who.access_key, url=req.query.get("encoding-type") == "url"))
