"""The MetaNode: cluster manager of DataNodes, streams, extents and placement (DESIGN §2, §7).

Every MetaNode serves the wire protocol; only the leader answers, the others reply
``not_leader`` with the leader's address. State lives in the cluster schema
(:mod:`.schema`), written only by the leader inside transactions fenced by its epoch.
Heartbeats and device usage live in the leader's memory.

Requests (clients unless noted):

    open_stream  {owner, redundancy, holder[, ec_backend, ec_cell_bytes]}
                                                        → {stream_id, lease_ttl_s, extent_max_bytes}
    renew        {holder}                               → {streams: [ids still held]}
    alloc_extent {stream_id, holder, avoid: [node ids]} → extent map (see ``_extent_map``)
    seal_extent  {extent_id, holder, length}            → {length}
    close_stream {stream_id, holder}                    → {}
    get_extents  {extent_ids}                           → {extents: [extent map]}
    report_bad   {extent_id, node_id, reason}           → {}
    status       {}                                     → nodes, devices, extent health, repair progress
    drain        {node_id, cancel}  (operators)         → {state}
    heartbeat    {node_id, address, ...} (DataNodes)    → {reconcile: [{extent_id, action, length}]}
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection, Engine

from appendfs.db import is_retryable
from appendfs.store import ec
from appendfs.store.codec import BlockError, verify_blocks
from appendfs.store.metanode import leader as leadership
from appendfs.store.metanode import plan
from appendfs.store.metanode.config import MetaNodeConfig
from appendfs.store.metanode.maintain import Maintainer, extent_views
from appendfs.store.metanode.schema import device, extent, node, replica, store_counter, stream
from appendfs.store.placement import Candidate, PolicyError, choose, logical_id, parse_policy
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
T = TypeVar("T")
OWNERS = frozenset({"fs", "s3-part", "raw"})
_ID_BATCH = 64


@dataclass
class NodeLive:
    """What the leader knows of a DataNode from its heartbeats (memory only)."""

    node_id: str
    address: str
    failure_domain: str
    last_seen: float  # trio.current_time() of the last heartbeat
    devices: list[dict[str, Any]] = field(default_factory=list)
    persisted_at: float = -math.inf
    unreachable_at: float = -math.inf  # when a create on it last failed to connect or time out


class MetaNode:
    def __init__(self, cfg: MetaNodeConfig, engine: Engine, auth: ClusterAuth, extent_max_bytes: int,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.auth = auth
        self.extent_max_bytes = extent_max_bytes
        self.address = cfg.advertise or cfg.listen
        self.rng = rng or random.Random()
        self.epoch: int | None = None
        self.lead_since = 0.0
        self.nodes: dict[str, NodeLive] = {}
        self._db_lane = trio.CapacityLimiter(4)
        self._ids: dict[str, list[int]] = {"stream": [0, 0], "extent": [0, 0]}
        self._leader_scope: trio.CancelScope | None = None
        self._pool: ChannelPool | None = None
        self.node_states: dict[str, tuple[str, str, str]] = {}  # node id → (state, address, domain), from SQL
        self.maintainer = Maintainer(self)
        self.stats = {"allocations": 0, "seals": 0, "fences": 0, "bad_reports": 0, "heartbeats": 0}

    # ---- lifetime -------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_address(self.cfg.listen)
        async with ChannelPool(self.auth, connect_timeout_s=3.0) as pool, trio.open_nursery() as nursery:
            self._pool = pool
            bound = await nursery.start(serve, host, port, self.handle, self.auth, ServerOptions(node="metanode"))
            if port == 0:
                self.address = f"{host}:{bound}"
            nursery.start_soon(self._elect)
            task_status.started(bound)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db_lane)

    async def _elect(self) -> None:
        lock = leadership.make_lock(self.engine)
        while True:
            try:
                if await self._db(lock.try_acquire):
                    self.epoch = await self._db(leadership.claim, self.engine, self.address)
                    self.lead_since = trio.current_time()
                    self._ids = {"stream": [0, 0], "extent": [0, 0]}
                    log.info("metanode %s leads with epoch %d", self.address, self.epoch)
                    try:
                        with trio.CancelScope() as scope:
                            self._leader_scope = scope
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(self._fence_loop)
                                self.maintainer = Maintainer(self)
                                nursery.start_soon(self.maintainer.run)
                                nursery.start_soon(self._watch_lock, lock)
                    finally:
                        log.warning("metanode %s stops leading (epoch %s)", self.address, self.epoch)
                        self.epoch = None
                        self.nodes.clear()
                        await self._db(lock.release)
            except sa.exc.DBAPIError as exc:
                log.warning("election: database unavailable: %s", exc.__class__.__name__)
            await trio.sleep(self.cfg.election_interval_s)

    async def _watch_lock(self, lock: leadership.LeaderLock) -> None:
        while await self._db(lock.still_held):
            await trio.sleep(self.cfg.election_interval_s)
        self._step_down("leader lock lost")

    def _step_down(self, why: str) -> None:
        log.error("stepping down: %s", why)
        if self._leader_scope is not None:
            self._leader_scope.cancel()

    # ---- transactions ---------------------------------------------------------------

    def _tx(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a write transaction fenced by our epoch; retry transient conflicts."""
        epoch = self.epoch
        if epoch is None:
            raise leadership.NotLeader("not leading")
        for attempt in range(8):
            try:
                with self.engine.begin() as c:
                    leadership.fence(c, epoch)
                    return fn(c)
            except sa.exc.DBAPIError as exc:
                if not is_retryable(exc) or attempt == 7:
                    raise
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    async def _write(self, fn: Callable[[Connection], T]) -> T:
        if self.epoch is None:
            raise RpcError("not_leader", "this metanode is not leading")
        try:
            return await self._db(self._tx, fn)
        except leadership.NotLeader:
            self._step_down("epoch superseded")
            raise RpcError("not_leader", "this metanode lost the leadership") from None
        except sa.exc.DBAPIError as exc:
            raise RpcError("unavailable", f"database error: {exc.__class__.__name__}") from None

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            # A read-only begin: on SQLite a plain BEGIN that never takes the write lock.
            with self.engine.connect().execution_options(appendfs_read_only=True) as c:
                return fn(c)
        try:
            return await self._db(run)
        except sa.exc.DBAPIError as exc:
            raise RpcError("unavailable", f"database error: {exc.__class__.__name__}") from None

    async def _next_id(self, name: str) -> int:
        span = self._ids[name]
        if span[0] >= span[1]:
            def take(c: Connection) -> int:
                row = c.execute(sa.select(store_counter.c.next_value).where(store_counter.c.name == name)).scalar_one()
                c.execute(store_counter.update().where(store_counter.c.name == name).values(next_value=row + _ID_BATCH))
                return int(row)
            first = await self._write(take)
            span[0], span[1] = first, first + _ID_BATCH
        value = span[0]
        span[0] += 1
        return value

    # ---- dispatch -------------------------------------------------------------------

    async def handle(self, req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        started.started()
        if self.epoch is None:
            _, address = await self._read(lambda c: leadership.current(self.engine))
            raise RpcError("not_leader", "this metanode is a standby", leader=address or "")
        handler = getattr(self, f"op_{req.op}", None)
        if handler is None:
            raise RpcError("bad_request", f"unknown operation {req.op!r}")
        try:
            return await handler(**req.args), b""
        except TypeError as exc:
            raise RpcError("bad_request", f"malformed {req.op} request: {exc}") from None

    # ---- streams --------------------------------------------------------------------

    async def op_open_stream(self, owner: str, redundancy: str, holder: str, ec_backend: str | None = None,
                             ec_cell_bytes: int | None = None) -> dict[str, Any]:
        if owner not in OWNERS:
            raise RpcError("bad_request", f"owner {owner!r} is not one of {sorted(OWNERS)}")
        try:
            policy = parse_policy(redundancy)
        except PolicyError as exc:
            raise RpcError("bad_request", str(exc)) from None
        if policy.then is not None:
            # rep:N>ec:K+M: DataNodes encode when the maintainer transcodes, with the backend
            # this leader chooses now (recorded with the stream, read back by every decoder).
            try:
                ec_backend = ec.choose_backend(policy.then.data, policy.then.parity).name
                ec_cell_bytes = ec.Layout(policy.then.data, policy.then.parity).cell_bytes
            except ec.EcError as exc:
                raise RpcError("bad_request", f"cannot keep {policy.then}: {exc}") from None
        elif policy.kind == "ec":
            # The client encodes, so it names the backend and cell size; we only check them
            # (a reader decodes with what is recorded here, never its own preference).
            if ec_backend not in ec.BACKEND_CODES:
                raise RpcError("bad_request", f"EC backend {ec_backend!r} is not one of {sorted(ec.BACKEND_CODES)}")
            try:
                ec.Layout(policy.data, policy.parity, int(ec_cell_bytes or 0))
            except (ec.LayoutError, TypeError, ValueError) as exc:
                raise RpcError("bad_request", f"EC cell size {ec_cell_bytes!r}: {exc}") from None
        else:
            ec_backend, ec_cell_bytes = None, None
        stream_id = await self._next_id("stream")
        now = time.time_ns()
        expiry = now + int(self.cfg.lease_ttl_s * 1e9)
        await self._write(lambda c: c.execute(stream.insert().values(
            stream_id=stream_id, owner=owner, redundancy=str(policy), state="open", lease_holder=holder,
            lease_expiry_ns=expiry, created_ns=now, ec_backend=ec_backend,
            ec_cell_bytes=None if ec_cell_bytes is None else int(ec_cell_bytes))))
        return {"stream_id": stream_id, "lease_ttl_s": self.cfg.lease_ttl_s, "extent_max_bytes": self.extent_max_bytes}

    async def op_renew(self, holder: str) -> dict[str, Any]:
        expiry = time.time_ns() + int(self.cfg.lease_ttl_s * 1e9)

        def renew(c: Connection) -> list[int]:
            now = time.time_ns()
            held = stream.c.lease_holder == holder
            c.execute(stream.update().where(held, stream.c.state == "open", stream.c.lease_expiry_ns >= now)
                      .values(lease_expiry_ns=expiry))
            rows = c.execute(sa.select(stream.c.stream_id).where(held, stream.c.state == "open",
                                                                  stream.c.lease_expiry_ns == expiry))
            return [int(r.stream_id) for r in rows]
        return {"streams": await self._write(renew)}

    @staticmethod
    def _check_lease(c: Connection, stream_id: int, holder: str) -> sa.Row[Any]:
        row = c.execute(sa.select(stream).where(stream.c.stream_id == stream_id)).first()
        if row is None:
            raise RpcError("not_found", f"stream {stream_id} does not exist")
        if row.state != "open" or row.lease_holder != holder or row.lease_expiry_ns < time.time_ns():
            raise RpcError("lease_lost", f"stream {stream_id} is not held by {holder} (fenced or expired)")
        return row

    async def op_close_stream(self, stream_id: int, holder: str) -> dict[str, Any]:
        def close(c: Connection) -> None:
            self._check_lease(c, stream_id, holder)
            open_ext = c.execute(sa.select(extent.c.extent_id).where(extent.c.stream_id == stream_id,
                                                                      extent.c.state == "open")).first()
            if open_ext is not None:
                raise RpcError("conflict", f"extent {open_ext.extent_id} of stream {stream_id} is still open: seal it first")
            c.execute(stream.update().where(stream.c.stream_id == stream_id)
                      .values(state="closed", lease_holder=None, lease_expiry_ns=None))
        await self._write(close)
        return {}

    # ---- extents --------------------------------------------------------------------

    def _candidates(self) -> tuple[list[Candidate], int, int]:
        """Healthy devices with room, plus counts of live nodes and of full ones."""
        now = trio.current_time()
        out, live, full = [], 0, 0
        for n in self.nodes.values():
            if now - n.last_seen > self.cfg.dead_after_s:
                continue
            live += 1
            if self.node_states.get(n.node_id, ("active",))[0] != "active":
                continue  # draining, drained or removed: no new extents
            for d in n.devices:
                if d.get("full"):
                    full += 1
                    continue
                out.append(Candidate(d["device_id"], n.node_id, n.address, n.failure_domain, int(d["free_bytes"])))
        return out, live, full

    async def op_alloc_extent(self, stream_id: int, holder: str, avoid: list[str] | None = None,
                              seq: int | None = None) -> dict[str, Any]:
        srow = await self._read(lambda c: self._check_lease(c, stream_id, holder))
        if seq is not None:  # a retried allocation whose answer was lost: hand out the same extent
            def existing(c: Connection) -> dict[str, Any] | None:
                row = c.execute(sa.select(extent.c.extent_id).where(
                    extent.c.stream_id == stream_id, extent.c.seq == seq, extent.c.state == "open")).first()
                return None if row is None else self._extent_map(c, row.extent_id, {})
            found = await self._read(existing)
            if found is not None:
                return {**found, "under_replicated": len(found["replicas"]) < parse_policy(srow.redundancy).width}
        policy = parse_policy(srow.redundancy)
        need, minimum = policy.width, policy.write_min(self.cfg.write_min, self.cfg.ec_missing_max)
        extent_id = await self._next_id("extent")
        avoid_set = frozenset(avoid or ()) | self._suspects()
        placed: list[tuple[Candidate, int]] = []
        failed: set[str] = set()
        for _round in range(3):
            candidates, live, full = self._candidates()
            candidates = [c for c in candidates if c.node_id not in failed and c.node_id not in {p.node_id for p, _ in placed}]
            domains = {p.failure_domain for p, _ in placed}
            candidates = [c for c in candidates if c.failure_domain not in domains]
            chosen = choose(candidates, need - len(placed), self.rng, avoid_set)
            if not chosen:
                break
            # Each copy is created with the slot (replica / fragment index) it is placed in: an
            # EC reader checks that the two agree. A slot whose create failed is offered again.
            slots = sorted(set(range(need)) - {idx for _, idx in placed})[:len(chosen)]
            results = await self._create_on(chosen, extent_id, stream_id, slots)
            for cand, idx, ok in zip(chosen, slots, results, strict=True):
                if ok:
                    placed.append((cand, idx))
                else:
                    failed.add(cand.node_id)
            if len(placed) >= need:
                break
        if len(placed) < minimum:
            await self._cleanup_created(extent_id, [c for c, _ in placed])
            candidates, live, full = self._candidates()
            if full and not candidates:
                raise RpcError("no_space", f"no device has room for a new extent ({full} full)")
            raise RpcError("unavailable", f"only {len(placed)} of {need} replicas could be placed "
                                          f"({live} DataNodes alive); at least {minimum} needed")

        def record(c: Connection) -> int:
            self._check_lease(c, stream_id, holder)
            last = c.execute(sa.select(extent.c.seq, extent.c.state).where(extent.c.stream_id == stream_id)
                             .order_by(extent.c.seq.desc()).limit(1)).first()
            if last is not None and last.state == "open":
                raise RpcError("conflict", f"stream {stream_id} still has an open extent: seal it first")
            seq = 0 if last is None else last.seq + 1
            coded = policy.kind == "ec"  # not for rep:N>ec:K+M: its extents are written replicated
            c.execute(extent.insert().values(extent_id=extent_id, stream_id=stream_id, seq=seq, state="open",
                                             sealed_length=None, redundancy=str(policy.write), placement_epoch=1,
                                             created_ns=time.time_ns(), ec_backend=srow.ec_backend if coded else None,
                                             ec_cell_bytes=srow.ec_cell_bytes if coded else None))
            for cand, idx in placed:
                c.execute(replica.insert().values(extent_id=extent_id, idx=idx, node_id=cand.node_id,
                                                  device_id=cand.device_id, state="ok", reason=None))
            return seq
        try:
            seq = await self._write(record)
        except RpcError:
            await self._cleanup_created(extent_id, [c for c, _ in placed])
            raise
        self.stats["allocations"] += 1
        if len(placed) < need:
            log.warning("extent %d placed on %d of %d nodes (degraded): under-replicated", extent_id, len(placed), need)
        return {"extent_id": extent_id, "seq": seq, "epoch": 1, "state": "open", "sealed_length": None,
                "redundancy": str(policy.write), **_layout_field(srow),
                "replicas": [{"idx": idx, "node_id": c.node_id, "address": c.address, "state": "ok"} for c, idx in placed],
                "under_replicated": len(placed) < need}

    async def _create_on(self, chosen: list[Candidate], extent_id: int, stream_id: int, slots: list[int]) -> list[bool]:
        results = [False] * len(chosen)

        async def one(i: int, cand: Candidate) -> None:
            assert self._pool is not None
            try:
                ch = await self._pool.get(cand.address)
                await ch.call("create", {"extent_id": extent_id, "stream_id": stream_id, "epoch": 1,
                                         "index": slots[i]}, timeout_s=self.cfg.create_timeout_s)
                results[i] = True
            except (ConnectionLost, RpcError, trio.TooSlowError) as exc:
                why = f"no answer within {self.cfg.create_timeout_s:g} s" if isinstance(exc, trio.TooSlowError) else exc
                log.warning("create of extent %d on %s failed: %s", extent_id, cand.node_id, why)
                if not isinstance(exc, RpcError) and (live := self.nodes.get(cand.node_id)) is not None:
                    live.unreachable_at = trio.current_time()
                if isinstance(exc, RpcError) and exc.code == "no_space":
                    self._mark_full(cand.node_id)
        async with trio.open_nursery() as nursery:
            for i, cand in enumerate(chosen):
                nursery.start_soon(one, i, cand)
        return results

    def _suspects(self) -> frozenset[str]:
        """Nodes a create could not reach and that have not heartbeated since: placed on
        only if nothing else will do (like a writer's ``avoid``), until ``dead_after_s``
        declares them dead or a heartbeat clears them. Without this, every allocation in
        the seconds after a DataNode died tried a create on it first — instant when the
        connection is refused, ``create_timeout_s`` when the host is gone."""
        now = trio.current_time()
        return frozenset(n.node_id for n in self.nodes.values()
                         if n.unreachable_at > n.last_seen and now - n.unreachable_at < self.cfg.dead_after_s)

    def _mark_full(self, node_id: str) -> None:
        n = self.nodes.get(node_id)
        if n is not None:
            for d in n.devices:
                d["full"] = True

    async def _cleanup_created(self, extent_id: int, placed: list[Candidate]) -> None:
        for cand in placed:
            try:
                assert self._pool is not None
                ch = await self._pool.get(cand.address)
                await ch.call("delete", {"extent_id": extent_id}, timeout_s=self.cfg.create_timeout_s)
            except (ConnectionLost, RpcError, trio.TooSlowError):
                pass

    @staticmethod
    def _extent_map(c: Connection, extent_id: int, addresses: dict[str, str]) -> dict[str, Any] | None:
        row = c.execute(sa.select(extent).where(extent.c.extent_id == extent_id)).first()
        if row is None:
            return None
        reps = c.execute(sa.select(replica, node.c.address).join(node, node.c.node_id == replica.c.node_id)
                         .where(replica.c.extent_id == extent_id).order_by(replica.c.idx)).all()
        local = {} if row.local_id is None else {"local_id": int(row.local_id)}  # DataNodes' id for its copies
        return {"extent_id": extent_id, "stream_id": row.stream_id, "seq": row.seq, "epoch": row.placement_epoch,
                "state": row.state, "sealed_length": row.sealed_length, "redundancy": row.redundancy,
                **_layout_field(row), **local,
                "replicas": [{"idx": r.idx, "node_id": r.node_id, "address": addresses.get(r.node_id, r.address),
                              "state": r.state} for r in reps]}

    async def op_get_extents(self, extent_ids: list[int]) -> dict[str, Any]:
        addresses = {n.node_id: n.address for n in self.nodes.values()}

        def get(c: Connection) -> list[dict[str, Any]]:
            out = []
            for i in extent_ids[:1024]:
                m = self._extent_map(c, int(i), addresses)
                if m is not None:
                    out.append(m)
            return out
        return {"extents": await self._read(get)}

    async def op_seal_extent(self, extent_id: int, holder: str, length: int) -> dict[str, Any]:
        def check(c: Connection) -> dict[str, Any] | None:
            row = c.execute(sa.select(extent.c.stream_id).where(extent.c.extent_id == extent_id)).first()
            if row is None:
                raise RpcError("not_found", f"extent {extent_id} does not exist")
            self._check_lease(c, row.stream_id, holder)
            return self._extent_map(c, extent_id, {})
        emap = await self._read(check)
        assert emap is not None
        return {"length": await self._seal(emap, int(length))}

    async def _seal(self, emap: dict[str, Any], length: int) -> int:
        """Seal every reachable replica at ``length`` and record it; unreachable ones reconcile later."""
        extent_id = emap["extent_id"]
        if emap["state"] == "sealed":
            if emap["sealed_length"] != length:
                raise RpcError("conflict", f"extent {extent_id} is sealed at {emap['sealed_length']}",
                               length=emap["sealed_length"])
            return length
        outcome: dict[int, tuple[str, str | None]] = {}
        stored = _stored_length(emap, length)  # an EC fragment holds whole records of the logical bytes

        async def one(rep: dict[str, Any]) -> None:
            assert self._pool is not None
            address = self._address_of(rep)
            try:
                ch = await self._pool.get(address)
                await ch.call("seal", {"extent_id": extent_id, "length": stored}, timeout_s=self.cfg.create_timeout_s)
                outcome[rep["idx"]] = ("ok", None)
            except RpcError as exc:
                state = "missing" if exc.code in ("short", "not_found") else "corrupt"
                outcome[rep["idx"]] = (state, exc.message[:250])
                log.error("seal of extent %d on %s failed: %s", extent_id, rep["node_id"], exc)
            except (ConnectionLost, trio.TooSlowError) as exc:
                outcome[rep["idx"]] = ("unsealed", f"unreachable at seal: {exc}"[:250])
        async with trio.open_nursery() as nursery:
            for rep in emap["replicas"]:
                if rep["state"] in ("ok", "unsealed"):
                    nursery.start_soon(one, rep)

        def record(c: Connection) -> None:
            res = c.execute(extent.update().where(extent.c.extent_id == extent_id, extent.c.state == "open")
                            .values(state="sealed", sealed_length=length))
            if res.rowcount != 1:
                raise RpcError("conflict", f"extent {extent_id} was sealed concurrently")
            for idx, (state, reason) in outcome.items():
                c.execute(replica.update().where(replica.c.extent_id == extent_id, replica.c.idx == idx)
                          .values(state=state, reason=reason))
        await self._write(record)
        self.stats["seals"] += 1
        return length

    def _address_of(self, rep: dict[str, Any]) -> str:
        live = self.nodes.get(rep["node_id"])
        return live.address if live is not None else str(rep["address"])

    async def op_report_bad(self, extent_id: int, node_id: str, reason: str) -> dict[str, Any]:
        """A copy failed verification. ``extent_id`` is the id the DataNode stores it under
        (its own id, or the transcoded one): a report about a copy no longer in use (an
        old replica awaiting deletion beside a new fragment) changes nothing."""
        logical = logical_id(int(extent_id))
        log.error("corrupt replica reported: extent %d on node %s: %s", logical, node_id, reason)
        self.stats["bad_reports"] += 1

        def mark(c: Connection) -> None:
            current = c.execute(sa.select(sa.func.coalesce(extent.c.local_id, extent.c.extent_id))
                                .where(extent.c.extent_id == logical)).scalar()
            if current is not None and int(current) != int(extent_id):
                log.info("report of extent %d on %s concerns a copy no longer in use (id %x)", logical, node_id,
                         extent_id)
                return
            c.execute(replica.update().where(replica.c.extent_id == logical, replica.c.node_id == node_id)
                      .values(state="corrupt", reason=reason[:250]))
        await self._write(mark)
        return {}

    # ---- fencing of dead writers ----------------------------------------------------

    async def _fence_loop(self) -> None:
        # A new leader gives writers one lease period to find it before fencing anyone.
        await trio.sleep(self.cfg.lease_ttl_s)
        while True:
            try:
                expired = await self._read(self._expired_streams)
            except RpcError as exc:  # the database is away: try again next round
                log.warning("cannot look for expired leases: %s", exc)
                expired = []
            for stream_id in expired:
                try:
                    await self._fence(stream_id)
                except (RpcError, ConnectionLost) as exc:
                    log.warning("fencing stream %d failed, will retry: %s", stream_id, exc)
            await trio.sleep(1.0)

    @staticmethod
    def _expired_streams(c: Connection) -> list[int]:
        now = time.time_ns()
        rows = c.execute(sa.select(stream.c.stream_id).where(stream.c.state == "open", stream.c.lease_expiry_ns < now))
        return [int(r.stream_id) for r in rows]

    async def _fence(self, stream_id: int) -> None:
        """The writer is gone: seal its open extent at the minimum over reachable replicas."""
        def open_extent(c: Connection) -> dict[str, Any] | None:
            row = c.execute(sa.select(extent.c.extent_id).where(extent.c.stream_id == stream_id,
                                                                 extent.c.state == "open")).first()
            return None if row is None else self._extent_map(c, row.extent_id, {})
        emap = await self._read(open_extent)
        if emap is not None:
            lengths = []
            for rep in emap["replicas"]:
                try:
                    assert self._pool is not None
                    ch = await self._pool.get(self._address_of(rep))
                    st, _ = await ch.call("stat", {"extent_id": emap["extent_id"]}, timeout_s=self.cfg.create_timeout_s)
                    lengths.append(int(st["length"]))
                except (ConnectionLost, RpcError, trio.TooSlowError):
                    continue
            if not lengths:
                raise RpcError("unavailable", f"no replica of extent {emap['extent_id']} reachable")
            end = min(lengths) if "layout" not in emap else await self._ec_fence_end(emap, min(lengths))
            await self._seal(emap, end)
            log.info("fenced stream %d: extent %d sealed at %d", stream_id, emap["extent_id"], end)
        await self._write(lambda c: c.execute(stream.update().where(stream.c.stream_id == stream_id)
                                              .values(state="closed", lease_holder=None, lease_expiry_ns=None)))
        if emap is None:
            log.info("fenced stream %d: its writer's lease expired with no extent open", stream_id)
        self.stats["fences"] += 1

    async def _ec_fence_end(self, emap: dict[str, Any], min_fragment: int) -> int:
        """Logical end of a fenced EC extent: the whole records every reachable fragment has
        (a torn record past them was never acknowledged), ended by the last record's header.

        Fragments that did not answer ``stat`` are not waited for: if one of them held fewer
        records, the seal marks it missing and the stripes stay decodable from the others
        only while K of them hold every record (repair's job once it exists).
        """
        layout = _layout_of(emap)
        assert layout is not None
        records = layout.records_in(min_fragment)
        if records == 0:
            return 0
        off, size = layout.record_span(records - 1, 1)
        for rep in emap["replicas"]:
            try:
                assert self._pool is not None
                ch = await self._pool.get(self._address_of(rep))
                result, data = await ch.call("read", {"extent_id": emap["extent_id"], "offset": off, "length": size},
                                             timeout_s=self.cfg.create_timeout_s)
                record = data[off - int(result["start"]):][:size]
                verify_blocks(data, result["entries"], int(result["start"]) // 4096)
                head = ec.parse_header(layout, record)
            except (ConnectionLost, RpcError, trio.TooSlowError, BlockError, ec.EcError) as exc:
                log.warning("fence: last record of extent %d on %s unusable: %s", emap["extent_id"], rep["node_id"], exc)
                continue
            if head.extent_id == emap["extent_id"] and head.stripe == records - 1:
                return layout.logical_end(head)
        raise RpcError("unavailable", f"no fragment of extent {emap['extent_id']} returned its last record")

    # ---- DataNodes ------------------------------------------------------------------

    async def op_heartbeat(self, node_id: str, address: str, failure_domain: str, devices: list[dict[str, Any]],
                           recovering: list[list[int]]) -> dict[str, Any]:
        now = trio.current_time()
        live = self.nodes.get(node_id)
        if live is None or live.address != address:
            log.info("datanode %s registered at %s", node_id, address)
            live = NodeLive(node_id, address, failure_domain, now, devices)
            self.nodes[node_id] = live
            self.maintainer.sweep.add(node_id)  # copies re-created elsewhere while it was away
        elif now - live.last_seen > self.cfg.dead_after_s:
            log.info("datanode %s is back after %.0f s", node_id, now - live.last_seen)
            self.maintainer.sweep.add(node_id)
        live.last_seen, live.devices = now, devices
        self.stats["heartbeats"] += 1
        if now - live.persisted_at > 10.0:
            live.persisted_at = now
            await self._write(lambda c: self._persist_node(c, live))
        actions = [await self._reconcile(node_id, int(e), int(n)) for e, n in recovering]
        return {"reconcile": [a for a in actions if a is not None]}

    @staticmethod
    def _persist_node(c: Connection, live: NodeLive) -> None:
        now = time.time_ns()
        res = c.execute(node.update().where(node.c.node_id == live.node_id).values(
            address=live.address, failure_domain=live.failure_domain, last_seen_ns=now))
        if res.rowcount == 0:
            c.execute(node.insert().values(node_id=live.node_id, address=live.address, failure_domain=live.failure_domain,
                                           state="active", first_seen_ns=now, last_seen_ns=now))
        for d in live.devices:
            values = {"node_id": live.node_id, "backend": d.get("backend", "file"),
                      "capacity_bytes": int(d["capacity_bytes"]), "used_bytes": int(d["used_bytes"])}
            res = c.execute(device.update().where(device.c.device_id == d["device_id"]).values(**values))
            if res.rowcount == 0:
                c.execute(device.insert().values(device_id=d["device_id"], **values))

    async def _reconcile(self, node_id: str, extent_id: int, local_length: int) -> dict[str, Any] | None:
        """A DataNode restarted with ``extent_id`` open: tell it how the extent ended."""
        emap = await self._read(lambda c: self._extent_map(c, extent_id, {}))
        if emap is None:
            return {"extent_id": extent_id, "action": "delete"}  # never recorded: garbage of a failed allocation
        mine = [r for r in emap["replicas"] if r["node_id"] == node_id]
        if not mine:
            return {"extent_id": extent_id, "action": "delete"}
        if emap["state"] == "open":
            srow = await self._read(lambda c: c.execute(sa.select(stream).where(stream.c.stream_id == emap["stream_id"])).first())
            if srow is not None and srow.lease_expiry_ns is not None and srow.lease_expiry_ns < time.time_ns():
                await self._fence(emap["stream_id"])
            return None  # the live writer will seal it (the seal reaches this node), or the fence will
        sealed = _stored_length(emap, int(emap["sealed_length"]))
        if local_length < sealed:
            log.error("replica of extent %d on %s has %d bytes, fewer than sealed %d: marking it missing",
                      extent_id, node_id, local_length, sealed)
            await self._write(lambda c: c.execute(replica.update().where(
                replica.c.extent_id == extent_id, replica.c.node_id == node_id).values(
                state="missing", reason=f"only {local_length} of {sealed} bytes after restart")))
            return {"extent_id": extent_id, "action": "delete"}
        await self._write(lambda c: c.execute(replica.update().where(
            replica.c.extent_id == extent_id, replica.c.node_id == node_id, replica.c.state == "unsealed").values(
            state="ok", reason=None)))
        return {"extent_id": extent_id, "action": "seal", "length": sealed}

    # ---- capacity (statfs) ----------------------------------------------------------

    async def op_capacity(self) -> dict[str, Any]:
        """Raw bytes of live devices, from heartbeats in memory (no SQL: statfs calls it often)."""
        now = trio.current_time()
        total = used = free = 0
        for n in self.nodes.values():
            if now - n.last_seen > self.cfg.dead_after_s:
                continue
            for d in n.devices:
                total += int(d["capacity_bytes"])
                used += int(d["used_bytes"])
                free += 0 if d.get("full") else int(d["free_bytes"])
        return {"capacity_bytes": total, "used_bytes": used, "free_bytes": free}

    # ---- status ---------------------------------------------------------------------

    async def op_status(self) -> dict[str, Any]:
        now = trio.current_time()

        def gather(c: Connection) -> dict[str, Any]:
            nodes = [dict(r._mapping) for r in c.execute(sa.select(node).order_by(node.c.node_id))]
            devices = [dict(r._mapping) for r in c.execute(sa.select(device).order_by(device.c.device_id))]
            counts = c.execute(sa.select(extent.c.state, sa.func.count()).group_by(extent.c.state)).all()
            codes = c.execute(sa.select(extent.c.redundancy, extent.c.ec_backend, extent.c.ec_cell_bytes, sa.func.count())
                              .where(extent.c.ec_backend.is_not(None))
                              .group_by(extent.c.redundancy, extent.c.ec_backend, extent.c.ec_cell_bytes)).all()
            ec_use = [{"redundancy": r[0], "backend": r[1], "cell_bytes": r[2], "extents": r[3]} for r in codes]
            return {"nodes": nodes, "devices": devices, "views": extent_views(c, sa.true()), "counts": dict(counts),
                    "ec": ec_use, "states": _node_rows(nodes)}
        raw = await self._read(gather)
        views = self.maintainer.node_views(raw["states"])
        summary = {"healthy": 0, "degraded": 0, "under_replicated": 0, "lost": 0}
        unhealthy = []
        for e in raw["views"]:
            h = plan.health(e, views)
            summary[h] += 1
            if h != "healthy":
                unhealthy.append(e.extent_id)
        live_devices = {d["device_id"]: d for n in self.nodes.values() for d in n.devices}
        stored = plan.stored_by_node(e for e in raw["views"] if e.sealed_length)
        for n in raw["nodes"]:
            live = self.nodes.get(n["node_id"])
            v = views.get(n["node_id"])
            n["alive"] = bool(v and v.alive)
            n["dead"] = bool(v and v.dead)  # declared dead: its copies are being re-created
            n["stored_bytes"] = stored.get(n["node_id"], 0)
            n["seen_ago_s"] = None if live is None else round(now - live.last_seen, 1)
            if live is not None:
                n["address"] = live.address
        for d in raw["devices"]:
            if d["device_id"] in live_devices:
                ld = live_devices[d["device_id"]]
                d.update(capacity_bytes=ld["capacity_bytes"], used_bytes=ld["used_bytes"],
                         free_bytes=ld["free_bytes"], full=ld["full"])
        return {"leader": self.address, "epoch": self.epoch, "nodes": raw["nodes"], "devices": raw["devices"],
                "extents": {"open": raw["counts"].get("open", 0), "sealed": raw["counts"].get("sealed", 0), **summary},
                "under_replicated_extents": unhealthy[:200], "erasure_coding": raw["ec"],
                "repair": self.maintainer.progress()}

    # ---- drain ----------------------------------------------------------------------

    async def op_drain(self, node_id: str, cancel: bool = False) -> dict[str, Any]:
        """Start (or cancel) draining a DataNode: no new extents there, and the maintainer
        copies every sealed extent away; the node becomes ``drained`` once it holds none."""
        def set_state(c: Connection) -> str:
            row = c.execute(sa.select(node.c.state).where(node.c.node_id == node_id)).first()
            if row is None:
                raise RpcError("not_found", f"no DataNode {node_id!r} has ever registered")
            state = "active" if cancel else ("drained" if row.state == "drained" else "draining")
            c.execute(node.update().where(node.c.node_id == node_id).values(state=state))
            return state
        state = await self._write(set_state)
        old = self.node_states.get(node_id, (state, "", node_id))
        self.node_states[node_id] = (state, old[1], old[2])
        log.info("node %s: %s", node_id, "drain cancelled" if cancel else "draining")
        self.maintainer.wake.set()
        return {"node_id": node_id, "state": state}


def _node_rows(nodes: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    return {n["node_id"]: (n["state"], n["address"], n["failure_domain"]) for n in nodes}


def _layout_field(row: Any) -> dict[str, Any]:
    """The ``layout`` entry of an extent map (EC extents only) from a stream or extent row."""
    policy = parse_policy(row.redundancy)
    if row.ec_backend is None or policy.kind != "ec":  # rep, or a rep:N>ec:K+M stream's replicated extents
        return {}
    return {"layout": {"k": policy.data, "m": policy.parity, "cell_bytes": int(row.ec_cell_bytes),
                       "backend": row.ec_backend}}


def _layout_of(emap: dict[str, Any]) -> ec.Layout | None:
    lay = emap.get("layout")
    return None if lay is None else ec.Layout(int(lay["k"]), int(lay["m"]), int(lay["cell_bytes"]))


def _stored_length(emap: dict[str, Any], logical_length: int) -> int:
    """Bytes each replica (rep) or fragment file (ec) of an extent with that logical end holds."""
    layout = _layout_of(emap)
    return logical_length if layout is None else layout.fragment_length(logical_length)
