"""The LogStreams a file-layer client writes through: a few per redundancy policy.

Files do not get a stream each (a stream costs a lease and an open extent at the
MetaNode); every client keeps ``streams_per_policy`` streams per policy, owner ``fs``, and
a file always uses the same one (``ino % n``) so its appends complete in write order.
The S3 gateway keeps a second pool with owner ``s3-part`` for multipart parts (DESIGN §8:
the owner tells a future GC which index decides liveness). A
stream that broke (lease lost, no space, no healthy DataNodes for too long) is replaced
on next use; the chunks that were on it fail with that error at their file's flush.
"""

from __future__ import annotations

import logging

import trio

from appendfs.store.client import LogStream, StoreClient

log = logging.getLogger(__name__)

OWNER = "fs"


class StreamPool:
    def __init__(self, client: StoreClient, per_policy: int, owner: str = OWNER) -> None:
        self.client = client
        self.per_policy = per_policy
        self.owner = owner
        self._streams: dict[tuple[str, int], LogStream] = {}
        self._opening: dict[tuple[str, int], trio.Lock] = {}

    async def stream_for(self, redundancy: str, ino: int) -> LogStream:
        key = (redundancy, ino % self.per_policy)
        s = self._streams.get(key)
        if s is not None and s.failed is None:
            return s
        lock = self._opening.setdefault(key, trio.Lock())
        async with lock:
            s = self._streams.get(key)
            if s is not None and s.failed is None:
                return s
            if s is not None:
                log.warning("stream %d (%s) failed: %s — opening a new one", s.stream_id, redundancy, s.failed)
            s = await self.client.create_stream(self.owner, redundancy)
            self._streams[key] = s
            return s

    async def close(self) -> None:
        """Seal and release every stream (at unmount, after files were flushed)."""
        for s in list(self._streams.values()):
            if s.failed is not None:
                continue
            try:
                await s.close()
            except Exception as exc:  # the MetaNode's lease expiry fences it anyway
                log.warning("closing stream %d: %s", s.stream_id, exc)
        self._streams.clear()
