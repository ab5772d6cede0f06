"""Service and bucket operations: ListBuckets, Create/Head/Delete Bucket, ListObjects (v1
and v2), GetBucketLocation, GetBucketVersioning.

Listings come from the namespace's dentry index in key byte order
(:meth:`appendfs.meta.Meta.list_subtree`), one page per request. The continuation token
is the last key returned, base64url-encoded: stateless, so any gateway can continue a
listing another one started.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

from appendfs.meta import ListResult, S3Bucket
from appendfs.s3 import xml
from appendfs.s3.errors import S3Error
from appendfs.s3.http import Request, Response, check_bucket_name

if TYPE_CHECKING:
    from appendfs.s3.gateway import Gateway, Principal


async def list_buckets(gw: Gateway, req: Request, who: Principal) -> Response:
    buckets: list[S3Bucket] = await gw.call(gw.meta.s3_buckets, who.tenant.name)
    return Response.xml(xml.list_buckets(who.access_key, [(b.name, b.created_ns) for b in buckets]))


async def create_bucket(gw: Gateway, req: Request, who: Principal) -> Response:
    assert req.bucket is not None
    check_bucket_name(req.bucket)
    body = await req.body.read_all(gw.cfg.max_xml_bytes)
    where = xml.parse_create_bucket(body)
    if where and where != gw.cfg.region:
        raise S3Error("InvalidLocationConstraint",
                      f"this endpoint serves region {gw.cfg.region}, not {where}")
    await gw.call(gw.meta.s3_bucket_create, req.bucket, who.tenant.name)
    gw.forget_bucket(req.bucket)
    return Response(200, [("location", f"/{req.bucket}")])


async def head_bucket(gw: Gateway, req: Request, who: Principal) -> Response:
    await gw.bucket(req, who)
    return Response(200, [("x-amz-bucket-region", gw.cfg.region)])


async def delete_bucket(gw: Gateway, req: Request, who: Principal) -> Response:
    b = await gw.bucket(req, who)  # another tenant's bucket: AccessDenied, not NoSuchBucket
    await gw.call(gw.meta.s3_bucket_delete, b.name, who.tenant.name)
    gw.forget_bucket(b.name)
    return Response(204)


async def location(gw: Gateway, req: Request, who: Principal) -> Response:
    await gw.bucket(req, who)
    return Response.xml(xml.location(gw.cfg.region))


async def versioning(gw: Gateway, req: Request, who: Principal) -> Response:
    await gw.bucket(req, who)
    return Response.xml(xml.versioning())


def _max_keys(req: Request) -> int:
    raw = req.query.get("max-keys", "1000")
    try:
        n = int(raw)
    except ValueError:
        raise S3Error("InvalidArgument", "max-keys must be an integer") from None
    if n < 0:
        raise S3Error("InvalidArgument", "max-keys must not be negative")
    return min(n, 1000)


def _encoding(req: Request) -> bool:
    enc = req.query.get("encoding-type")
    if enc not in (None, "url"):
        raise S3Error("InvalidArgument", "encoding-type must be url")
    return enc == "url"


def encode_token(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_token(token: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(token.encode())
    except (binascii.Error, ValueError):
        raise S3Error("InvalidArgument", "the continuation token is not valid") from None


async def _page(gw: Gateway, bucket: S3Bucket, prefix: bytes, delimiter: bytes | None, after: bytes | None,
                max_keys: int) -> tuple[ListResult, list[tuple[bytes, int, int, str]]]:
    res: ListResult = await gw.call(gw.meta.list_subtree, bucket.ino, prefix=prefix, delimiter=delimiter,
                                    start_after=after, max_keys=max_keys)
    etags = await gw.listing_etags(res.objects)
    return res, [(o.key, o.size, o.mtime_ns, etags[o.ino]) for o in res.objects]


async def list_objects(gw: Gateway, req: Request, who: Principal) -> Response:
    bucket = await gw.bucket(req, who)
    v2 = req.query.get("list-type") == "2"
    url = _encoding(req)
    max_keys = _max_keys(req)
    prefix = req.query.get("prefix", "").encode()
    delimiter = req.query.get("delimiter", "").encode() or None
    if v2:
        token = req.query.get("continuation-token")
        start_after = req.query.get("start-after", "").encode() or None
        after = decode_token(token) if token else start_after
        res, objects = await _page(gw, bucket, prefix, delimiter, after, max_keys)
        nxt = encode_token(res.next_start_after) if res.is_truncated and res.next_start_after else None
        owner = who.access_key if req.query.get("fetch-owner") == "true" else None
        return Response.xml(xml.list_objects_v2(
            bucket=bucket.name, prefix=prefix, delimiter=delimiter, max_keys=max_keys, url=url, objects=objects,
            prefixes=res.common_prefixes, truncated=res.is_truncated, token=token, next_token=nxt,
            start_after=start_after, owner=owner))
    marker = req.query.get("marker", "").encode()
    res, objects = await _page(gw, bucket, prefix, delimiter, marker or None, max_keys)
    return Response.xml(xml.list_objects_v1(
        bucket=bucket.name, prefix=prefix, delimiter=delimiter, max_keys=max_keys, url=url, objects=objects,
        prefixes=res.common_prefixes, truncated=res.is_truncated, marker=marker,
        next_marker=res.next_start_after, owner=who.access_key))
