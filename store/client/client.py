"""StoreClient: the heavyweight client of the store (DESIGN §2).

One object per process: it reads the cluster identity and the leader's address from
META_URL, keeps authenticated channels to the MetaNode and DataNodes, renews the leases of
its streams, caches extent maps, and offers

* ``create_stream(owner, redundancy)`` → :class:`LogStream` (append / flush / close), and
* ``read(extent_id, offset, length)`` → verified bytes, trying every replica before
  failing and reporting any replica whose bytes do not match their checksums. An
  ``ec:K+M`` extent is read from its data fragments' cells, or its stripes are decoded
  from any K fragments when one fails (``_read_ec``).

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
from appendfs.store import ec
from appendfs.store.client.config import ClientConfig
from appendfs.store.client.local import FDS_IDLE_S, LocalReads
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
        self.stats: dict[str, int] = {"bad_replicas": 0, "read_fallbacks": 0}
        self.local = LocalReads(auth.cluster_id, inline_bytes=cfg.local_inline_bytes, stats=self.stats,
                                direct=cfg.local_direct_reads) if cfg.short_circuit else None

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
                if client.local is not None:
                    nursery.start_soon(client._expire_local, client.local)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
                    if client.local is not None:
                        client.local.close()
        finally:
            if own_engine:
                engine.dispose()

    # ---- streams --------------------------------------------------------------------

    async def create_stream(self, owner: str, redundancy: str = "rep:3") -> LogStream:
        try:
            policy = parse_policy(redundancy)
        except PolicyError as exc:
            raise StoreError(str(exc)) from None
        args: dict[str, Any] = {"owner": owner, "redundancy": redundancy, "holder": self.holder}
        codec = None
        if policy.kind == "ec":  # we encode, so we choose the backend; the MetaNode records it
            try:
                backend = ec.choose_backend(policy.data, policy.parity).name
                codec = ec.Codec(ec.Layout(policy.data, policy.parity, self.cfg.ec_cell_bytes), backend)
            except ec.EcError as exc:
                raise StoreError(f"cannot write {redundancy}: {exc}") from None
            args.update(ec_backend=backend, ec_cell_bytes=self.cfg.ec_cell_bytes)
        try:
            res = await self.meta.call("open_stream", args)
        except RpcError as exc:
            raise StoreError(f"cannot open a stream: {exc.message}") from None
        s = LogStream(self, int(res["stream_id"]), redundancy, owner, int(res["extent_max_bytes"]), codec)
        self._streams[s.stream_id] = s
        self._nursery.start_soon(s.run)
        if not self._renewing:
            self._renewing = True
            self._nursery.start_soon(self._renew_leases, float(res["lease_ttl_s"]))
        return s

    @staticmethod
    async def _expire_local(local: LocalReads) -> None:
        """Close short-circuit descriptors nobody read lately: they would keep the blocks
        of extents deleted since allocated on the DataNode's disk (local.FDS_IDLE_S)."""
        while True:
            await trio.sleep(FDS_IDLE_S / 2)
            local.expire(trio.current_time())

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

    async def read(self, extent_id: int, offset: int, length: int) -> bytes | bytearray:
        """``length`` verified bytes at ``offset`` of the logical extent."""
        if length == 0:
            return b""
        errors: list[str] = []
        for refresh in (False, True):
            m = await self.extent_map(extent_id, refresh=refresh)
            if "layout" in m:  # erasure-coded, maybe only since this refresh (transcoded)
                return await self._read_ec(extent_id, offset, length)
            replicas = sorted(m["replicas"], key=lambda r: (r["state"] not in ("ok",), (r["idx"] + extent_id) % 7))
            for rep in replicas:
                if rep["state"] in ("missing",):
                    continue
                try:
                    return await self._read_replica(_local(m), int(m["epoch"]), rep, offset, length,
                                                    sealed=m.get("state") == "sealed")
                except RpcError as exc:
                    errors.append(f"{rep['node_id']}: {exc}")
                    if exc.code == "stale_epoch":
                        break  # the placement changed: refresh the map before trying more replicas
                except BlockError as exc:
                    errors.append(f"{rep['node_id']}: corrupt ({exc})")
                    self.stats["bad_replicas"] += 1
                    log.error("extent %d on node %s: %s — reporting and reading another replica",
                              extent_id, rep["node_id"], exc)
                    await self._report_bad(_local(m), rep["node_id"], str(exc))
                except (ConnectionLost, trio.TooSlowError) as exc:
                    errors.append(f"{rep['node_id']}: {str(exc) or 'timeout'}")
                self.stats["read_fallbacks"] += 1
        raise Unreadable(f"no replica of extent {extent_id} returned verified bytes for "
                         f"[{offset}, {offset + length}): {'; '.join(errors)}")

    async def _read_ec(self, extent_id: int, offset: int, length: int) -> bytes:
        """Logical bytes of an EC extent: the data fragments' cells when they all answer,
        else the touched stripes decoded from any K fragments; never unverified bytes."""
        errors: list[str] = []
        for refresh in (False, True):
            m = await self.extent_map(extent_id, refresh=refresh)
            codec = _codec_of(m)
            frags = {int(r["idx"]): r for r in m["replicas"] if r["state"] != "missing"}
            spans = codec.layout.read_spans(offset, length)
            fetched = await self._read_fragments(extent_id, m, codec.layout, frags, spans, errors)
            if len(fetched) == len(spans):
                return codec.layout.assemble(offset, length, fetched)
            self.stats["read_fallbacks"] += 1
            try:
                return await self._decode_ec(extent_id, m, codec, frags, set(spans) - set(fetched), offset, length,
                                             errors)
            except ec.EcError as exc:  # fewer than K intact fragments, or records that make no sense
                errors.append(str(exc))
        raise Unreadable(f"extent {extent_id} (erasure-coded {m['redundancy']}): fewer than "
                         f"{codec.layout.k} fragments returned verified bytes for [{offset}, {offset + length}): "
                         f"{'; '.join(dict.fromkeys(errors))}")  # both passes usually fail alike

    async def _read_fragments(self, extent_id: int, m: dict[str, Any], layout: ec.Layout,
                              frags: dict[int, dict[str, Any]], spans: dict[int, tuple[int, int]], errors: list[str],
                              *, headers: bool = True) -> dict[int, tuple[int, bytes]]:
        """Read [start, end) of each fragment in ``spans`` in parallel; {index: (start, bytes)}
        of those that returned verified bytes (failures are noted in ``errors`` and reported).
        A fragment is refused as corrupt when its DataNode stores another index there or a
        record header in the span names another extent, stripe or index (``headers``; the
        decoder checks the headers of the whole records it reads itself, and they decide)."""
        out: dict[int, tuple[int, bytes]] = {}

        async def one(idx: int, start: int, end: int) -> None:
            rep = frags.get(idx)
            if rep is None:
                errors.append(f"fragment {idx}: missing")
                return
            try:
                data = await self._read_replica(_local(m), int(m["epoch"]), rep, start, end - start,
                                                index=idx if headers else None, sealed=m.get("state") == "sealed")
                if isinstance(data, bytearray):  # (fragments are read buffered: see LocalReads.read)
                    data = bytes(data)
                if headers:
                    ec.check_span(layout, data, start=start, extent_id=extent_id, index=idx)
                out[idx] = (start, data)
            except RpcError as exc:
                errors.append(f"fragment {idx} on {rep['node_id']}: {exc}")
            except (BlockError, ec.CorruptFragment) as exc:
                errors.append(f"fragment {idx} on {rep['node_id']}: corrupt ({exc})")
                await self._bad_fragment(_local(m), rep, str(exc))
            except (ConnectionLost, trio.TooSlowError) as exc:
                errors.append(f"fragment {idx} on {rep['node_id']}: {str(exc) or 'timeout'}")
        async with trio.open_nursery() as nursery:
            for idx, (start, end) in spans.items():
                nursery.start_soon(one, idx, start, end)
        return out

    async def _decode_ec(self, extent_id: int, m: dict[str, Any], codec: ec.Codec, frags: dict[int, dict[str, Any]],
                         failed: set[int], offset: int, length: int, errors: list[str]) -> bytes:
        """Degraded read: whole records of the touched stripes from K fragments (more if some
        fail), decoded and checked cell by cell (``Codec.decode``)."""
        layout = codec.layout
        first = layout.stripe_of(offset)
        start, size = layout.record_span(first, layout.stripe_of(offset + length - 1) - first + 1)
        order = sorted((i for i in frags if i not in failed),
                       key=lambda i: (frags[i]["state"] != "ok", i >= layout.k, i))
        records: dict[int, bytes] = {}
        while order:
            n = max(1, layout.k - len(records))
            batch, order = order[:n], order[n:]
            got = await self._read_fragments(extent_id, m, layout, frags, {i: (start, start + size) for i in batch},
                                             errors, headers=False)
            records.update({i: data for i, (_, data) in got.items()})
            if len(records) < layout.k and order:
                continue
            try:
                decoded = codec.decode(records, extent_id=extent_id, first_stripe=first, ext_off=offset, length=length)
            except ec.NotEnoughFragments as exc:
                for i, why in exc.bad.items():
                    if records.pop(i, None) is not None:
                        await self._bad_fragment(_local(m), frags[i], why)
                if not order:
                    raise
                continue
            for i, why in decoded.bad.items():
                await self._bad_fragment(_local(m), frags[i], why)
            return decoded.data
        raise ec.NotEnoughFragments(first, len(records), layout.k, {})

    async def _bad_fragment(self, extent_id: int, rep: dict[str, Any], reason: str) -> None:
        self.stats["bad_replicas"] += 1
        log.error("extent %d fragment %d on node %s: %s — reporting it", extent_id, rep["idx"], rep["node_id"], reason)
        await self._report_bad(extent_id, rep["node_id"], reason)

    async def _read_replica(self, extent_id: int, epoch: int, rep: dict[str, Any], offset: int, length: int,
                            *, index: int | None = None, sealed: bool = False) -> bytes | bytearray:
        """Verified bytes of one copy; ``extent_id`` is the id the DataNode stores it under.
        With ``index`` (an EC fragment) the copy must have been created as that index. A
        sealed copy on this host is read from its files when we can (store/client/local.py)."""
        if sealed and self.local is not None:
            if self.local.should_ask(rep["address"], trio.current_time()):
                await self._probe_local(rep["address"])
            got = await self.local.read(rep["address"], str(rep["node_id"]), extent_id, offset, length, index)
            if got is not None:
                return got
        ch = await self.pool.get(rep["address"], lane="r")
        result, data = await ch.call("read", {"extent_id": extent_id, "offset": offset, "length": length, "epoch": epoch},
                                     timeout_s=self.cfg.read_timeout_s)
        if index is not None and result.get("index", index) != index:
            raise ec.CorruptFragment(index, -1, f"the DataNode stores fragment {result['index']} of this extent "
                                                f"where fragment {index} is placed")
        start = int(result["start"])
        verify_blocks(data, result["entries"], start // 4096, check_entries=False)
        skip = offset - start
        if skip < 0 or len(data) < skip + length:
            raise BlockError(start // 4096, f"replica returned {len(data)} bytes from {start}, short of the range")
        return data[skip:skip + length] if (skip or len(data) != length) else data

    async def _probe_local(self, address: str) -> None:
        """Ask a DataNode once whether its extents can be read here directly (``ping``)."""
        assert self.local is not None
        try:
            ch = await self.pool.get(address, lane="r")
            res, _ = await ch.call("ping", {}, timeout_s=self.cfg.connect_timeout_s)
        except (RpcError, ConnectionLost, trio.TooSlowError):
            self.local.unanswered(address, trio.current_time())  # the read through it will say why
            return
        self.local.learn(address, str(res.get("node_id", "")), res.get("local_dir"))

    async def _report_bad(self, extent_id: int, node_id: str, reason: str) -> None:
        try:
            await self.meta.call("report_bad", {"extent_id": extent_id, "node_id": node_id, "reason": reason}, wait_s=5.0)
        except (StoreError, RpcError) as exc:
            log.warning("could not report the bad replica: %s", exc)

    async def read_pieces(self, pieces: list[tuple[int, int, int]]) -> AsyncIterator[bytes | bytearray]:
        """Yield the bytes of (extent, offset, length) pieces in order, reading ahead in parallel."""
        chunks: list[tuple[int, int, int]] = []
        step = self.cfg.read_bytes
        for extent_id, off, length in pieces:
            for o in range(off, off + length, step):
                chunks.append((extent_id, o, min(step, off + length - o)))
        results: dict[int, bytes | bytearray] = {}
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


def _local(m: dict[str, Any]) -> int:
    """The id DataNodes store an extent's copies under (another than its own once transcoded)."""
    return int(m.get("local_id", m["extent_id"]))


def _codec_of(m: dict[str, Any]) -> ec.Codec:
    """The codec an EC extent was written with (its recorded backend, never our preference)."""
    lay = m["layout"]
    try:
        return ec.Codec(ec.Layout(int(lay["k"]), int(lay["m"]), int(lay["cell_bytes"])), str(lay["backend"]))
    except ec.EcError as exc:
        raise Unreadable(f"extent {m['extent_id']}: cannot decode here: {exc}") from None
