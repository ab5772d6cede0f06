"""The ASGI application: request → authentication → operation → response, and the one
place exceptions become S3 error documents.

Routing follows S3's REST API with path-style addressing (``/bucket/key``; what boto3,
the aws cli and rclone use against an endpoint given by IP address or with path style
forced). The operation is chosen by method, whether a bucket and a key are present and
the sub-resource in the query (``?uploads``, ``?uploadId=``, ``?delete``, ``?location``…).
Sub-resources we do not implement (ACLs, policies, tagging, lifecycle…) answer
``NotImplemented`` (501) rather than being mistaken for plain object requests.

Every request is authenticated (SigV4: header or presigned) before anything else is
looked at; anonymous requests are refused. Errors raised anywhere are translated by
:func:`appendfs.s3.errors.translate`; unknown ones are logged with their traceback and
answered ``InternalError`` (500): the server never dies of a request.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appendfs.s3 import buckets, multipart, objects, sigv4, xml
from appendfs.s3.body import Body
from appendfs.s3.errors import S3Error, translate
from appendfs.s3.gateway import Gateway, Principal
from appendfs.s3.http import Request, Response

log = logging.getLogger(__name__)

Op = Callable[[Gateway, Request, Principal], Awaitable[Response]]

_UNSUPPORTED = frozenset({
    "acl", "policy", "policyStatus", "tagging", "cors", "lifecycle", "website", "logging", "notification",
    "replication", "encryption", "object-lock", "ownershipControls", "publicAccessBlock", "requestPayment",
    "accelerate", "analytics", "metrics", "inventory", "intelligent-tiering", "retention", "legal-hold",
    "torrent", "restore", "select", "attributes", "versionId", "versions",
})


def route(req: Request) -> Op:
    """The operation for a request (raises MethodNotAllowed / NotImplemented)."""
    q, m = req.query, req.method
    unsupported = _UNSUPPORTED.intersection(q)
    if unsupported:
        raise S3Error("NotImplemented", f"the ?{sorted(unsupported)[0]} sub-resource is not supported")
    if req.bucket is None:
        if m == "GET":
            return buckets.list_buckets
        raise S3Error("MethodNotAllowed", f"{m} is not allowed on the service")
    if req.key is None:
        return _bucket_route(req)
    if m == "PUT":
        return multipart.upload_part if "uploadId" in q else objects.put_object
    if m in ("GET", "HEAD"):
        return multipart.list_parts if "uploadId" in q and m == "GET" else objects.get_object
    if m == "DELETE":
        return multipart.abort if "uploadId" in q else objects.delete_object
    if m == "POST":
        if "uploads" in q:
            return multipart.create
        if "uploadId" in q:
            return multipart.complete
    raise S3Error("MethodNotAllowed", f"{m} is not allowed on an object here")


def _bucket_route(req: Request) -> Op:
    q, m = req.query, req.method
    if m == "GET":
        if "location" in q:
            return buckets.location
        if "versioning" in q:
            return buckets.versioning
        if "uploads" in q:
            return multipart.list_uploads
        return buckets.list_objects
    if m == "PUT" and not q:
        return buckets.create_bucket
    if m == "HEAD":
        return buckets.head_bucket
    if m == "DELETE" and not q:
        return buckets.delete_bucket
    if m == "POST" and "delete" in q:
        return objects.delete_objects
    raise S3Error("MethodNotAllowed", f"{m} is not allowed on a bucket here")


class App:
    """The ASGI callable served by hypercorn."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rid = secrets.token_hex(8).upper()
        self.gw.stats["requests"] += 1
        req: Request | None = None
        try:
            req = Request.from_scope(scope, rid)
            who = await self.authenticate(req, receive)
            op = route(req)
            resp = await op(self.gw, req, who)
        except BaseException as exc:
            err = translate(exc)
            if err is None:
                if not isinstance(exc, Exception):
                    raise
                log.error("request %s %s failed", rid, req.resource if req else scope.get("path"), exc_info=exc)
                err = S3Error("InternalError", "we encountered an internal error; please try again")
            resp = self.error(err, req, rid, scope)
        resp.headers.append(("x-amz-request-id", rid))
        await _send(resp, send, head=scope["method"] == "HEAD")

    async def authenticate(self, req: Request, receive: Callable[[], Awaitable[dict[str, Any]]]) -> Principal:
        signed = sigv4.SignedRequest(req.method, req.raw_path.decode("latin-1"), req.query_string.decode("latin-1"),
                                     tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in req.headers))
        auth = sigv4.parse_auth(signed)
        if auth is None:
            raise S3Error("AccessDenied", "anonymous requests are not accepted: sign with an access key")
        key = await self.gw.access_key(auth.access_key_id)
        if key is None:
            raise S3Error("InvalidAccessKeyId", "the access key id does not exist in our records")
        ctx = sigv4.verify(signed, auth, key.secret_key, time.time(), max_skew_s=self.gw.cfg.max_skew_s,
                           region=self.gw.cfg.region)
        if ctx.payload_mode.aws_chunked:
            self.gw.stats["aws_chunked_requests"] += 1
        req.body = Body(req, receive, ctx)
        return Principal(key.access_key, key.tenant)

    def error(self, err: S3Error, req: Request | None, rid: str, scope: dict[str, Any]) -> Response:
        status = err.status
        self.gw.stats["errors_5xx" if status >= 500 else "errors_4xx"] += 1
        if status == 304:
            return Response(304, [])
        resource = err.resource or (req.resource if req else str(scope.get("path", "")))
        body = xml.error(err.code, err.message, resource, rid)
        headers = [("content-type", "application/xml")]
        if status == 503:
            headers.append(("retry-after", "1"))
        return Response(status, headers, body)


async def _send(resp: Response, send: Callable[[dict[str, Any]], Awaitable[None]], *, head: bool) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in resp.headers]
    body = resp.body
    if isinstance(body, bytes):
        if not head and resp.status != 304:
            headers.append((b"content-length", str(len(body)).encode()))
        elif head and resp.status >= 400:
            headers.append((b"content-length", b"0"))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
        return
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    async for data in body:  # an error here aborts the connection: never a wrong body
        await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _lifespan(receive: Callable[[], Awaitable[dict[str, Any]]],
                    send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
