"""The gateway's state and the steps every operation shares.

One :class:`Gateway` per process, over one :class:`~appendfs.fs.FileSystem` (never the
mount: the gateway runs on hosts without FUSE). It holds no state a second gateway
would need — keys, buckets, objects and uploads all live in the namespace — so several
gateways can serve the same volume side by side. What it keeps in memory is a cache:

* access keys for ``[s3] key_cache_s`` (a deleted key keeps working that long on a
  gateway that used it recently; unknown keys are remembered for a second);
* a queue of files whose MD5 ETag is unknown (written through the mount), computed in
  the background after a listing shows them so the next listing has the real value.

Background tasks (ETag computation, expiry of abandoned multipart uploads) live in the
gateway's nursery, owned by :func:`open_gateway`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from appendfs.fs import POLICY_XATTR, FileSystem
from appendfs.meta import NewSlice, ObjectEntry, PutConditions, S3Bucket, S3Key, S3Object, S3Tenant
from appendfs.meta.errors import S3Error as MetaS3Error
from appendfs.meta.slices import Segment, resolve
from appendfs.s3.config import S3Config
from appendfs.s3.errors import S3Error
from appendfs.s3.http import Request, check_key

log = logging.getLogger(__name__)
T = TypeVar("T")

_ETAG_QUEUE = 10_000
BUCKET_CACHE_S = 2.0  # how long a bucket lookup is reused


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified request comes from."""

    access_key: str
    tenant: S3Tenant


class Gateway:
    def __init__(self, fs: FileSystem, cfg: S3Config, nursery: trio.Nursery) -> None:
        self.fs = fs
        self.meta = fs.meta
        self.cfg = cfg
        self.inherit = (POLICY_XATTR,)
        self._nursery = nursery
        self._keys: dict[str, tuple[float, S3Key | None]] = {}
        self._buckets: dict[str, tuple[float, S3Bucket | None]] = {}
        self._etag_send, self._etag_recv = trio.open_memory_channel[tuple[int, int]](_ETAG_QUEUE)
        self._etag_pending: set[int] = set()
        self.stats = {"requests": 0, "errors_4xx": 0, "errors_5xx": 0, "bytes_in": 0, "bytes_out": 0,
                      "etags_computed": 0, "uploads_expired": 0,
                      "aws_chunked_requests": 0}

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await self.fs.call(fn, *args, **kw)

    async def read(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A short namespace read (one row or a few): inline on SQLite."""
        return await self.fs.read_call(fn, *args, **kw)

    # ---- who is asking -----------------------------------------------------------------

    async def access_key(self, access_key: str) -> S3Key | None:
        now = time.monotonic()
        hit = self._keys.get(access_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        key = await self.read(self.meta.s3_key, access_key)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[access_key] = (now + (self.cfg.key_cache_s if key is not None else 1.0), key)
        return key

    # ---- buckets and keys ----------------------------------------------------------------

    async def bucket_named(self, name: str, who: Principal) -> S3Bucket:
        now = time.monotonic()
        hit = self._buckets.get(name)
        if hit is not None and hit[0] > now:
            b = hit[1]
        else:
            # Cached briefly: a bucket deleted meanwhile fails in the namespace transaction
            # (its directory is gone), and a name re-created by anyone has a new inode.
            b = await self.read(self.meta.s3_bucket, name)
            if len(self._buckets) > 10_000:
                self._buckets.clear()
            self._buckets[name] = (now + BUCKET_CACHE_S, b)
        if b is None:
            raise S3Error("NoSuchBucket", f"the bucket {name!r} does not exist", resource=f"/{name}")
        if b.tenant != who.tenant.name:
            raise S3Error("AccessDenied", f"the bucket {name!r} belongs to another tenant", resource=f"/{name}")
        return b

    async def bucket(self, req: Request, who: Principal) -> S3Bucket:
        assert req.bucket is not None
        return await self.bucket_named(req.bucket, who)

    async def bucket_and_key(self, req: Request, who: Principal) -> tuple[S3Bucket, bytes]:
        assert req.key is not None
        check_key(req.key)
        return await self.bucket(req, who), req.key

    def check_size(self, req: Request) -> None:
        n = req.body.declared_length
        if n is None:
            raise S3Error("MissingContentLength", "a PUT needs Content-Length (or x-amz-decoded-content-length)")
        if n > self.cfg.max_object_bytes:
            raise S3Error("EntityTooLarge", f"{n} bytes; at most {self.cfg.max_object_bytes} in one PUT or part")

    # ---- data ------------------------------------------------------------------------------

    async def store_body(self, req: Request, bucket: S3Bucket, *, part: bool = False) -> tuple[list[NewSlice], int]:
        """Append the request body to the store (verified); its slices and size."""
        policy = await self.fs.policy_of(bucket.ino)
        async with self.fs.object_writer(policy, part=part) as w:
            async for data in req.body:
                await w.write(data)
            slices = await w.finish()
            self.stats["bytes_in"] += w.size
            return slices, w.size

    async def put(self, bucket: S3Bucket, key: bytes, slices: list[NewSlice], size: int, who: Principal,
                  etag: str, headers: dict[str, str], cond: PutConditions | None) -> S3Object:
        """Commit the key in one transaction; an unknown ETag a condition needs is computed first."""
        t = who.tenant
        for attempt in range(3):
            try:
                return await self.call(self.meta.s3_put_object, bucket.ino, key, slices, size, uid=t.uid, gid=t.gid,
                                       file_mode=t.file_mode, dir_mode=t.dir_mode, etag=etag, headers=headers,
                                       cond=cond, inherit_xattrs=self.inherit)
            except MetaS3Error as exc:
                if exc.code != "EtagUnknown" or attempt == 2:
                    raise
                current: S3Object = await self.call(self.meta.s3_get_object, bucket.ino, key)
                await self.compute_etag(current)
        raise AssertionError("unreachable")

    async def segments(self, obj: S3Object, start: int, end: int) -> list[Segment]:
        """The slice map of ``[start, end)`` of the object as it was when resolved: if the
        key was replaced meanwhile, the snapshot of the old inode is read (it stays readable)."""
        attr, items = await self.read(self.meta.slices, obj.attr.ino)
        if attr.gen != obj.attr.gen:
            raise S3Error("SlowDown",
                          "the object changed while it was being read; retry")
        return resolve(items, start, end - start)

    def forget_bucket(self, name: str) -> None:
        self._buckets.pop(name, None)

    def stream(self, segments: list[Segment], start: int, end: int) -> AsyncIterator[bytes | bytearray]:
        return self._stream(segments, start, end)

    async def _stream(self, segments: list[Segment], start: int, end: int) -> AsyncIterator[bytes | bytearray]:
        async with self.fs.read_range(segments, start, end) as reader:
            async for data in reader:
                self.stats["bytes_out"] += len(data)
                yield data

    async def compute_etag(self, obj: S3Object) -> str:
        """The true MD5 of a file whose ETag is unknown (written through the mount), stored
        for its generation so the next request finds it."""
        if obj.is_dir:
            return hashlib.md5(b"").hexdigest()
        md5 = hashlib.md5()
        segments = await self.segments(obj, 0, obj.attr.size)
        async for data in self._stream(segments, 0, obj.attr.size):
            md5.update(data)
        etag = md5.hexdigest()
        await self.call(self.meta.s3_set_etag, obj.attr.ino, obj.attr.gen, etag)
        self.stats["etags_computed"] += 1
        return etag

    async def listing_etags(self, objects: list[ObjectEntry]) -> dict[int, str]:
        """ETags for a listing page. Unknown ones (files written through the mount) are shown
        as an opaque tag that is not an MD5 (``<ino>-<gen>``-style, with a dash like a
        multipart ETag, so clients do not take it for one) and queued for computation."""
        known: dict[int, str] = await self.read(self.meta.s3_etags, [o.ino for o in objects])
        out = {}
        for o in objects:
            e = known.get(o.ino)
            if e is None:
                e = f"{o.ino:x}{o.mtime_ns:x}-0"
                if o.ino not in self._etag_pending and len(self._etag_pending) < _ETAG_QUEUE:
                    self._etag_pending.add(o.ino)
                    self._etag_send.send_nowait((o.ino, o.size))
            out[o.ino] = e
        return out

    async def _etag_worker(self) -> None:
        async for ino, _size in self._etag_recv:
            try:
                obj = await self.call(self.meta.s3_object_by_ino, ino)
                if obj is not None and obj.etag is None:
                    await self.compute_etag(obj)
            except Exception as exc:
                log.info("background ETag of inode %d: %s", ino, exc)
            finally:
                self._etag_pending.discard(ino)

    async def _expire_uploads(self) -> None:
        while True:
            try:
                cutoff = time.time_ns() - int(self.cfg.upload_expiry_s * 1e9)
                n = await self.call(self.meta.s3_uploads_expire, cutoff)
                if n:
                    log.info("aborted %d multipart uploads older than %.0f s", n, self.cfg.upload_expiry_s)
                    self.stats["uploads_expired"] += n
            except Exception as exc:
                log.warning("expiring multipart uploads: %s", exc)
            await trio.sleep(self.cfg.expiry_interval_s)


@asynccontextmanager
async def open_gateway(fs: FileSystem, cfg: S3Config) -> AsyncIterator[Gateway]:
    async with trio.open_nursery() as nursery:
        gw = Gateway(fs, cfg, nursery)
        nursery.start_soon(gw._etag_worker)
        nursery.start_soon(gw._expire_uploads)
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()
