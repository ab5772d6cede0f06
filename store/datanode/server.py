"""The DataNode daemon: serves extents of its device and follows the MetaNode.

Requests (op → args → result; bulk data raw in the frame):

    create  {extent_id, stream_id, epoch, index}              → {}
    append  {extent_id, offset, xxh3} + data                 → {length}   (durable on reply)
    read    {extent_id, offset, length, epoch?}              → {start} + data, {entries}
    seal    {extent_id, length}                              → {length}
    delete  {extent_id}                                      → {}
    stat    {extent_id}                                      → extent state
    list    {}                                               → {extents: [...]}
    ping    {}                                               → {node_id, usage, local_dir}
    rebuild {extent_id, stream_id, epoch, index, length,     → {length, read_bytes, seconds}
             sources: [{idx, node_id, address}],
             layout: {k, m, cell_bytes, backend} | absent, rate_bytes_s,
             logical_id?}  (extent_id: the id copies are stored under)
    transcode {extent_id, stream_id, epoch, length, read_id,  → {length, read_bytes, seconds}
               local_id, sources: [replicas], targets: [{idx, node_id, address}],
               layout, rate_bytes_s}   (encode a sealed replicated extent into K+M
               fragments created under local_id on the targets; repair.Transcoder)

The node never talks to SQL (DESIGN §7): it heartbeats to the MetaNode addresses it was
given, follows "not leader, go to X" redirects, and reconciles extents that were open at
a restart with the sealed lengths the MetaNode answers. ``rebuild`` (repair.py) makes this
node copy or reconstruct one replica / EC fragment of a sealed extent from its peers; the
scrub task (scrub.py) re-verifies sealed extents in the background and reports bad ones
to the MetaNode with ``report_bad``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from appendfs.store.datanode.backend import ExtentMeta, Usage
from appendfs.store.datanode.config import DataNodeConfig
from appendfs.store.datanode.extents import ExtentError, ExtentStore
from appendfs.store.datanode.repair import Rebuilder, RebuildJob, TranscodeJob, Transcoder
from appendfs.store.datanode.scrub import Scrubber
from appendfs.store.identity import NodeIdentity
from appendfs.store.rpc import (
    ChannelPool,
    ClusterAuth,
    ConnectionLost,
    RpcError,
    ServerOptions,
    Started,
    parse_address,
    serve,
)
from appendfs.store.wire import Request

log = logging.getLogger(__name__)


class DataNode:
    def __init__(self, cfg: DataNodeConfig, auth: ClusterAuth, ident: NodeIdentity, store: ExtentStore) -> None:
        self.cfg = cfg
        self.auth = auth
        self.ident = ident
        self.store = store
        self.address = cfg.advertise or cfg.listen
        self.registered = trio.Event()
        self._full = False  # as last reported, to log when the device fills and when it has room again
        self._metanode_index = 0
        self._redirect: str | None = None
        self._peers: ChannelPool | None = None  # to other DataNodes (rebuild) and the MetaNode (scrub reports)
        self.rebuilder: Rebuilder | None = None
        self.transcoder: Transcoder | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_address(self.cfg.listen)
        opts = ServerOptions(max_inflight=self.cfg.max_inflight, node=self.ident.node_id)
        async with ChannelPool(self.auth, connect_timeout_s=5.0) as peers, trio.open_nursery() as nursery:
            self._peers = peers

            def report_source(extent_id: int, node_id: str, reason: str) -> None:
                nursery.start_soon(self._report_bad, extent_id, reason, node_id)

            self.rebuilder = Rebuilder(self.store, peers, report_bad=report_source)
            self.transcoder = Transcoder(self.rebuilder)
            await nursery.start(self.store.run)
            bound = await nursery.start(serve, host, port, self.handle, self.auth, opts)
            if port == 0:
                self.address = f"{host}:{bound}"
            nursery.start_soon(self._heartbeats)
            if self.cfg.scrub_bytes_s > 0:
                scrubber = Scrubber(self.store, self._report_bad, rate_bytes_s=self.cfg.scrub_bytes_s,
                                    interval_s=self.cfg.scrub_interval_s, chunk_bytes=self.cfg.scrub_chunk_bytes,
                                    state_path=self.cfg.data / "scrub.json")
                nursery.start_soon(scrubber.run)
            log.info("datanode %s serving %s (%s backend)", self.ident.node_id, self.address, self.store.backend.kind)
            task_status.started(bound)

    # ---- requests -------------------------------------------------------------------

    async def handle(self, req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        a = req.args
        try:
            if req.op == "append":
                data = req.data if not isinstance(req.data, memoryview) else bytes(req.data)
                # (a large append arrives in a page-aligned bytearray: written from there)
                length = await self.store.append(int(a["extent_id"]), int(a["offset"]), data, int(a["xxh3"]), started)
                return {"length": length}, b""
            started.started()
            if req.op == "read":
                epoch = a.get("epoch")
                start, data, entries = await self.store.read(int(a["extent_id"]), int(a["offset"]), int(a["length"]),
                                                             None if epoch is None else int(epoch))
                return {"start": start, "entries": entries, "index": self.store.index_of(int(a["extent_id"]))}, data
            if req.op == "create":
                meta = ExtentMeta(extent_id=int(a["extent_id"]), stream_id=int(a["stream_id"]),
                                  epoch=int(a.get("epoch", 1)), index=int(a.get("index", 0)))
                await self.store.create(meta)
                return {}, b""
            if req.op == "seal":
                return {"length": await self.store.seal(int(a["extent_id"]), int(a["length"]))}, b""
            if req.op == "delete":
                await self.store.delete(int(a["extent_id"]), unsealed_only=bool(a.get("unsealed_only", False)))
                return {}, b""
            if req.op == "stat":
                return self.store.stat(int(a["extent_id"])), b""
            if req.op == "list":
                return {"extents": self.store.all_extents()}, b""
            if req.op == "ping":
                return {"node_id": self.ident.node_id, "usage": self._usage(),
                        "local_dir": self.store.backend.local_dir}, b""
            if req.op == "rebuild":
                if self.rebuilder is None:
                    raise RpcError("unavailable", "this DataNode is still starting")
                return await self.rebuilder.rebuild(RebuildJob.from_args(a)), b""
            if req.op == "transcode":
                if self.transcoder is None:
                    raise RpcError("unavailable", "this DataNode is still starting")
                return await self.transcoder.transcode(TranscodeJob.from_args(a)), b""
        except ExtentError as exc:
            raise RpcError(exc.code, exc.message, **exc.details) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise RpcError("bad_request", f"malformed {req.op} request: {exc!r}") from None
        raise RpcError("bad_request", f"unknown operation {req.op!r}")

    def device(self) -> tuple[Usage, bool]:
        """The device's usage and whether it is full, from one statvfs (heartbeats, ping,
        /metrics)."""
        u = self.store.backend.usage()
        return u, self.store.full(u)

    def _usage(self) -> dict[str, Any]:
        u, full = self.device()
        if full != self._full:
            self._full = full
            pct = 100.0 * u.used_bytes / u.capacity_bytes if u.capacity_bytes > 0 else 100.0
            state = (f"{pct:.1f}% used, {u.free_bytes >> 20} MiB free of {u.capacity_bytes >> 20} MiB "
                     f"(high_water {self.store.high_water:.0%}, reserve_bytes {self.store.reserve_bytes >> 20} MiB)")
            if full:
                log.warning("device full: %s: it takes no new extents; free space on %s, add DataNodes, or raise "
                            "high_water / capacity_bytes where the disk really has room", state, self.cfg.data)
            else:
                log.info("device has room again: %s", state)
        return {"capacity_bytes": u.capacity_bytes, "used_bytes": u.used_bytes, "free_bytes": u.free_bytes,
                "full": full, "backend": self.store.backend.kind}

    # ---- control plane --------------------------------------------------------------

    def _heartbeat_args(self) -> dict[str, Any]:
        return {"node_id": self.ident.node_id, "address": self.address,
                "failure_domain": self.cfg.failure_domain or self.ident.node_id,
                "devices": [{"device_id": f"{self.ident.node_id}/0", **self._usage()}],
                "recovering": [[i, n] for i, n in self.store.recovering()]}

    async def _heartbeats(self) -> None:
        # Until the first heartbeat lands (a MetaNode starting beside us, still electing its
        # leader), retry soon: 50 ms, doubling up to the interval. A node is usable only
        # once registered, and a cluster start should not wait out a whole interval for it.
        retry = 0.05
        async with ChannelPool(self.auth, connect_timeout_s=2.0) as pool:
            while True:
                try:
                    result = await self._call_leader(pool, "heartbeat", self._heartbeat_args())
                    self.registered.set()
                    await self._apply(result.get("reconcile", []))
                except (ConnectionLost, RpcError, trio.TooSlowError) as exc:
                    log.warning("heartbeat failed: %s", exc)
                if self.registered.is_set():
                    await trio.sleep(self.cfg.heartbeat_interval_s)
                else:
                    await trio.sleep(min(retry, self.cfg.heartbeat_interval_s))
                    retry *= 2

    async def _call_leader(self, pool: ChannelPool, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Call the leading MetaNode: try the configured addresses in turn, follow redirects."""
        addresses = list(self.cfg.metanode)
        last: Exception | None = None
        for _ in range(len(addresses) + 2):
            address = self._redirect or addresses[self._metanode_index % len(addresses)]
            try:
                ch = await pool.get(address)
                result, _ = await ch.call(op, args, timeout_s=10.0)
                return result
            except RpcError as exc:
                if exc.code != "not_leader":
                    raise
                last = exc
                leader = exc.details.get("leader")
                self._redirect = leader if leader and leader != address else None
                if not self._redirect:
                    self._metanode_index += 1
            except (ConnectionLost, trio.TooSlowError) as exc:
                last = exc
                self._redirect = None
                self._metanode_index += 1
        raise ConnectionLost(f"no leading MetaNode reachable: {last}")

    async def _report_bad(self, extent_id: int, reason: str, node_id: str | None = None) -> bool:
        """Tell the MetaNode that the copy of ``extent_id`` on ``node_id`` (default: ours, found
        by scrub; another node's: a rebuild source) is corrupt; True once it knows."""
        if self._peers is None:
            return False
        node_id = node_id or self.ident.node_id
        try:
            await self._call_leader(self._peers, "report_bad", {"extent_id": extent_id, "node_id": node_id,
                                                                "reason": reason})
            return True
        except (ConnectionLost, RpcError, trio.TooSlowError) as exc:
            log.warning("could not report the corrupt copy of extent %d on %s to the MetaNode: %s", extent_id,
                        node_id, exc)
            return False

    async def _apply(self, actions: list[dict[str, Any]]) -> None:
        for act in actions:
            extent_id = int(act["extent_id"])
            try:
                if act["action"] == "seal":
                    await self.store.seal(extent_id, int(act["length"]))
                    log.info("reconciled extent %d: sealed at %d", extent_id, act["length"])
                elif act["action"] == "delete":
                    await self.store.delete(extent_id)
                    log.info("reconciled extent %d: deleted (unknown to the MetaNode)", extent_id)
            except ExtentError as exc:
                log.error("reconcile of extent %d failed: %s", extent_id, exc)
                self.store.mark_bad(extent_id, str(exc))
