"""StoreClient: the heavyweight client of the store (DESIGN §2).

One object per process: it reads the cluster identity and the leader's address from
META_URL, keeps authenticated channels to the MetaNode and DataNodes, renews the leases of
its streams, caches extent maps, and offers

* ``create_stream(owner, redundancy)`` → :class:`LogStream` (append / flush / close), and
* ``read(extent_id, offset, length)`` → verified bytes, trying every replica before
  failing and reporting any replica whose bytes do not match their checksums.

Use it as ``async with StoreClient.connect(meta_url) as client:`` — every task it starts
(stream writers, lease renewal, channel readers) lives in its nursery.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from sqlalchemy.engine import Engine

from appendfs.db import make_engine
from appendfs.store.client.config import ClientConfig
from appendfs.store.client.metalink import MetaLink
from appendfs.store.client.stream import LogStream
from appendfs.store.codec import BlockError, verify_blocks
from appendfs.store.errors import LeaseLost, StoreError, Unreadable
from appendfs.store.metanode.schema import read_cluster
from appendfs.store.placement import PolicyError, parse_policy
from appendfs.store.rpc import ChannelPool, ClusterAuth, ConnectionLost, RpcError

log = logging.getLogger(__name__)
_MAPS_MAX = 100_000  # cached extent maps (a few hundred bytes each)


class StoreClient:
    def __init__(self, engine: Engine, auth: ClusterAuth, pool: ChannelPool, cfg: ClientConfig,
                 nursery: trio.Nursery, db_lane: trio.CapacityLimiter) -> None:
        self.engine = engine
        self.auth = auth
        self.pool = pool
        self.cfg = cfg
        self.holder = f"c-{uuid.uuid4().hex[:16]}"
        self.meta = MetaLink(engine, pool, wait_s=cfg.leader_wait_s, db_lane=db_lane)
        self._nursery = nursery
        self._streams: dict[int, LogStream] = {}
        self._maps: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._renewing = False
        self.stats = {"bad_replicas": 0, "read_fallbacks": 0}

    @classmethod
    @asynccontextmanager
    async def connect(cls, meta_url: str, cfg: ClientConfig | None = None,
                      engine: Engine | None = None) -> AsyncIterator[StoreClient]:
        cfg = cfg or ClientConfig()
        own_engine = engine is None
        engine = engine or make_engine(meta_url, pool_size=2, must_exist=True)
        db_lane = trio.CapacityLimiter(2)
        try:
            row = await trio.to_thread.run_sync(read_cluster, engine, limiter=db_lane)
            auth = ClusterAuth(row.cluster_id, row.secret)
            async with ChannelPool(auth, connect_timeout_s=cfg.connect_timeout_s) as pool, \
                    trio.open_nursery() as nursery:
                client = cls(engine, auth, pool, cfg, nursery, db_lane)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if own_engine:
                engine.dispose()

    # ---- streams --------------------------------------------------------------------

    async def create_stream(self, owner: str, redundancy: str = "rep:3") -> LogStream:
        try:
            parse_policy(redundancy)
        except PolicyError as exc:
            raise StoreError(str(exc)) from None
        try:
            res = await self.meta.call("open_stream", {"owner": owner, "redundancy": redundancy, "holder": self.holder})
        except RpcError as exc:
            raise StoreError(f"cannot open a stream: {exc.message}") from None
        s = LogStream(self, int(res["stream_id"]), redundancy, owner, int(res["extent_max_bytes"]))
        self._streams[s.stream_id] = s
        self._nursery.start_soon(s.run)
        if not self._renewing:
            self._renewing = True
            self._nursery.start_soon(self._renew_leases, float(res["lease_ttl_s"]))
        return s

    async def _renew_leases(self, ttl_s: float) -> None:
        while True:
            await trio.sleep(ttl_s / 4)
            if not self._streams:
                continue
            try:
                res = await self.meta.call("renew", {"holder": self.holder}, wait_s=ttl_s / 2)
            except (StoreError, RpcError) as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            held = set(res["streams"])
            for sid, s in list(self._streams.items()):
                if sid not in held:
                    log.error("lost the lease of stream %d", sid)
                    s._broken = LeaseLost(f"lease of stream {sid} lost (fenced after expiry)")

    async def capacity(self) -> dict[str, int]:
        """Raw capacity/used/free bytes of the live devices (for statfs)."""
        res = await self.meta.call("capacity", {}, wait_s=5.0)
        return {k: int(res[k]) for k in ("capacity_bytes", "used_bytes", "free_bytes")}

    # ---- extent maps ----------------------------------------------------------------

    def _cache_map(self, m: dict[str, Any]) -> None:
        self._maps[int(m["extent_id"])] = m
        if len(self._maps) > _MAPS_MAX:
            self._maps.popitem(last=False)

    def _forget_map(self, extent_id: int) -> None:
        self._maps.pop(extent_id, None)

    async def extent_map(self, extent_id: int, refresh: bool = False) -> dict[str, Any]:
        """The placement of an extent, cached (open extents too: a read only asks for bytes
        some writer saw acknowledged, and a stale map shows up as a failed or stale-epoch
        replica read, after which :meth:`read` refreshes it)."""
        m = self._maps.get(extent_id)
        if m is None or refresh:
            res = await self.meta.call("get_extents", {"extent_ids": [extent_id]})
            if not res["extents"]:
                raise Unreadable(f"extent {extent_id} does not exist")
            m = res["extents"][0]
            self._cache_map(m)
        else:
            self._maps.move_to_end(extent_id)
        return m

    # ---- reads ----------------------------------------------------------------------

    async def read(self, extent_id: int, offset: int, length: int) -> bytes:
        """``length`` verified bytes at ``offset`` of the logical extent."""
        if length == 0:
            return b""
        errors: list[str] = []
        for refresh in (False, True):
            m = await self.extent_map(extent_id, refresh=refresh)
            replicas = sorted(m["replicas"], key=lambda r: (r["state"] not in ("ok",), (r["idx"] + extent_id) % 7))
            for rep in replicas:
                if rep["state"] in ("missing",):
                    continue
                try:
                    return await self._read_replica(extent_id, int(m["epoch"]), rep, offset, length)
                except RpcError as exc:
                    errors.append(f"{rep['node_id']}: {exc}")
                    if exc.code == "stale_epoch":
                        break  # the placement changed: refresh the map before trying more replicas
                except BlockError as exc:
                    errors.append(f"{rep['node_id']}: corrupt ({exc})")
                    self.stats["bad_replicas"] += 1
                    log.error("extent %d on node %s: %s — reporting and reading another replica",
                              extent_id, rep["node_id"], exc)
                    await self._report_bad(extent_id, rep["node_id"], str(exc))
                except (ConnectionLost, trio.TooSlowError) as exc:
                    errors.append(f"{rep['node_id']}: {str(exc) or 'timeout'}")
                self.stats["read_fallbacks"] += 1
        raise Unreadable(f"no replica of extent {extent_id} returned verified bytes for "
                         f"[{offset}, {offset + length}): {'; '.join(errors)}")

    async def _read_replica(self, extent_id: int, epoch: int, rep: dict[str, Any], offset: int, length: int) -> bytes:
        ch = await self.pool.get(rep["address"], lane="r")
        result, data = await ch.call("read", {"extent_id": extent_id, "offset": offset, "length": length, "epoch": epoch},
                                     timeout_s=self.cfg.read_timeout_s)
        start = int(result["start"])
        verify_blocks(data, result["entries"], start // 4096)
        skip = offset - start
        if skip < 0 or len(data) < skip + length:
            raise BlockError(start // 4096, f"replica returned {len(data)} bytes from {start}, short of the range")
        return data[skip:skip + length] if (skip or len(data) != length) else data

    async def _report_bad(self, extent_id: int, node_id: str, reason: str) -> None:
        try:
            await self.meta.call("report_bad", {"extent_id": extent_id, "node_id": node_id, "reason": reason}, wait_s=5.0)
        except (StoreError, RpcError) as exc:
            log.warning("could not report the bad replica: %s", exc)

    async def read_pieces(self, pieces: list[tuple[int, int, int]]) -> AsyncIterator[bytes]:
        """Yield the bytes of (extent, offset, length) pieces in order, reading ahead in parallel."""
        chunks: list[tuple[int, int, int]] = []
        step = self.cfg.read_bytes
        for extent_id, off, length in pieces:
            for o in range(off, off + length, step):
                chunks.append((extent_id, o, min(step, off + length - o)))
        results: dict[int, bytes] = {}
        ready = {i: trio.Event() for i in range(len(chunks))}
        failure: list[BaseException] = []
        limit = trio.Semaphore(self.cfg.read_parallel)

        async def fetch(i: int) -> None:
            try:
                results[i] = await self.read(*chunks[i])
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready[i].set()

        async with trio.open_nursery() as nursery:
            async def feeder() -> None:
                for i in range(len(chunks)):
                    await limit.acquire()
                    nursery.start_soon(fetch, i)
            nursery.start_soon(feeder)
            for i in range(len(chunks)):
                await ready[i].wait()
                if failure:
                    raise failure[0]
                data = results.pop(i)
                limit.release()
                yield data
