"""The leader's maintainer: repair, drain, rebalance and orphan clean-up (issue 6).

Runs in the leading MetaNode's nursery. Every ``maintain_interval_s`` it reads the placement
of all sealed extents (one query), builds :mod:`.plan` views with what the leader knows of
the DataNodes (heartbeats in memory, node states in SQL) and queues the planned moves;
``repair_parallel`` workers carry them out:

1. the target DataNode gets ``rebuild {extent_id, epoch+1, index, length, sources, layout,
   rate_bytes_s}`` and copies (replica, fragment moved verbatim) or reconstructs (EC, from
   any K fragments) the copy from the sources, verified block by block, then seals it;
2. one transaction checks the extent's placement epoch is unchanged, repoints the replica
   row to the target (state ``ok``) and bumps the epoch: readers with the old map get
   ``stale_epoch`` from the new copy and refresh;
3. the replaced copy, when its node is alive, is deleted after ``delete_grace_s`` (readers
   holding the old map keep reading it meanwhile) — only if no replica row points there
   again by then.

Bandwidth: each worker's DataNode reads its sources at ``repair_bytes_s / repair_parallel``
at most, so all repair, drain and rebalance traffic together stays under
``repair_bytes_s`` (source reads; every byte read is written once on the target).

A DataNode that registers (new, restarted or back from the dead) has its sealed extents
that no replica row points to deleted: copies re-created elsewhere while it was away.
Progress is in memory (``progress()``, shown by ``appendfs status``); the plan itself is
recomputed from SQL every round, so a new leader carries on where the old one stopped.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection

from appendfs.store import ec
from appendfs.store.metanode import plan
from appendfs.store.metanode.schema import extent, node, replica
from appendfs.store.placement import parse_policy
from appendfs.store.rpc import ConnectionLost, RpcError

if TYPE_CHECKING:
    from appendfs.store.metanode.service import MetaNode

log = logging.getLogger(__name__)


def extent_views(c: Connection, where: Any = None) -> list[plan.ExtentView]:
    """Every sealed extent (or those matching ``where``) with its copies, in one query."""
    q = (sa.select(extent.c.extent_id, extent.c.stream_id, extent.c.redundancy, extent.c.ec_backend,
                   extent.c.ec_cell_bytes, extent.c.sealed_length, extent.c.placement_epoch,
                   replica.c.idx, replica.c.node_id, replica.c.state)
         .select_from(extent.outerjoin(replica, replica.c.extent_id == extent.c.extent_id))
         .where(extent.c.state == "sealed" if where is None else where)
         .order_by(extent.c.extent_id))
    views: dict[int, plan.ExtentView] = {}
    for r in c.execute(q):
        v = views.get(r.extent_id)
        if v is None:
            policy = parse_policy(r.redundancy)
            layout = None if r.ec_backend is None else ec.Layout(policy.data, policy.parity, int(r.ec_cell_bytes))
            v = views[r.extent_id] = plan.ExtentView(int(r.extent_id), int(r.stream_id), policy, layout, r.ec_backend,
                                                     int(r.sealed_length or 0), int(r.placement_epoch))
        if r.idx is not None:
            v.copies.append(plan.Copy(int(r.idx), r.node_id, r.state))
    return list(views.values())


class Maintainer:
    def __init__(self, meta: MetaNode) -> None:
        self.meta = meta
        self.cfg = meta.cfg
        self.rng = random.Random()
        self.queue: list[plan.Move] = []
        self.running: dict[int, plan.Move] = {}  # extent id → move in progress
        self.deletes: list[tuple[float, str, int]] = []  # (due, node id, extent id)
        self.sweep: set[str] = set()  # nodes whose orphans to delete
        self.stuck: list[str] = []
        self.imbalance = 0.0
        self.wake = trio.Event()
        self.stats = {"repairs": 0, "drain_moves": 0, "rebalance_moves": 0, "moved_bytes": 0, "move_failures": 0,
                      "orphans_deleted": 0}
        self.last_error: str | None = None
        self.started_at = math.inf

    # ---- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        self.started_at = trio.current_time()
        free = trio.Semaphore(self.cfg.repair_parallel)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await self._round(nursery, free)
                except (RpcError, ConnectionLost) as exc:
                    log.warning("maintenance round failed, will retry: %s", exc)
                with trio.move_on_after(self.cfg.maintain_interval_s):
                    await self.wake.wait()
                self.wake = trio.Event()

    async def _round(self, nursery: trio.Nursery, free: trio.Semaphore) -> None:
        await self._do_deletes()
        for node_id in list(self.sweep):
            self.sweep.discard(node_id)
            await self._sweep_orphans(node_id)
        views, states = await self.meta._read(lambda c: (extent_views(c), _node_states(c)))
        self.meta.node_states = states
        nodes = self.node_views(states)
        busy = frozenset(self.running)
        moves, self.stuck = plan.plan_repairs(views, nodes, self.rng, skip=busy)
        if moves:
            self.queue = moves
        elif self.running:  # rebalance moves were planned together: finish them before replanning
            self.queue = [m for m in self.queue if m.kind == "rebalance"]
        else:
            self.queue = plan.plan_rebalance(views, nodes, self.cfg.rebalance_spread)
        self.imbalance = plan.imbalance(views, nodes)
        await self._finish_drains(states, views)
        while self.queue and free.value > 0:
            mv = self.queue.pop(0)
            if mv.extent.extent_id in self.running:
                continue
            await free.acquire()
            self.running[mv.extent.extent_id] = mv
            nursery.start_soon(self._work, mv, free)

    def node_views(self, states: dict[str, tuple[str, str, str]]) -> dict[str, plan.NodeView]:
        """DataNodes as the plan sees them: alive from heartbeats, dead after ``repair_after_s``
        of silence (counted from when we began to lead for nodes we never heard)."""
        now = trio.current_time()
        out: dict[str, plan.NodeView] = {}
        for node_id in set(states) | set(self.meta.nodes):
            live = self.meta.nodes.get(node_id)
            state, address, domain = states.get(node_id, ("active", "", node_id))
            last = live.last_seen if live is not None else self.meta.lead_since
            alive = live is not None and now - live.last_seen <= self.cfg.dead_after_s
            dead = state == "removed" or (not alive and now - last > self.cfg.repair_after_s)
            dev = (live.devices if live is not None else None) or [{}]
            d = dev[0]
            out[node_id] = plan.NodeView(
                node_id, live.address if live is not None else address,
                live.failure_domain if live is not None else domain, str(d.get("device_id", f"{node_id}/0")),
                int(d.get("capacity_bytes", 0)), int(d.get("free_bytes", 0)), alive, dead,
                draining=state in ("draining", "drained"), full=bool(d.get("full")))
        return out

    # ---- one move -------------------------------------------------------------------

    async def _work(self, mv: plan.Move, free: trio.Semaphore) -> None:
        e = mv.extent
        try:
            await self._move(mv)
            self.stats["repairs" if mv.kind == "repair" else f"{mv.kind}_moves"] += 1
            self.stats["moved_bytes"] += e.stored_length
            log.info("%s: extent %d slot %d now on %s (%s)%s", mv.kind, e.extent_id, mv.idx, mv.target.node_id,
                     mv.reason, " in place" if mv.in_place else "")
        except (RpcError, ConnectionLost, trio.TooSlowError) as exc:
            self.stats["move_failures"] += 1
            self.last_error = f"{mv.kind} of extent {e.extent_id} slot {mv.idx} to {mv.target.node_id}: {exc}"
            log.error("%s", self.last_error)
        finally:
            del self.running[e.extent_id]
            free.release()
            self.wake.set()

    async def _move(self, mv: plan.Move) -> None:
        e = mv.extent
        addresses = {n.node_id: n.address for n in self.meta.nodes.values()}
        rate = int(self.cfg.repair_bytes_s / self.cfg.repair_parallel)
        args = {"extent_id": e.extent_id, "stream_id": e.stream_id, "epoch": e.epoch + 1, "index": mv.idx,
                "length": e.stored_length, "rate_bytes_s": rate,
                "sources": [{"idx": s.idx, "node_id": s.node_id, "address": addresses.get(s.node_id, "")}
                            for s in mv.sources if s.node_id in addresses],
                "layout": None if e.layout is None else {"k": e.layout.k, "m": e.layout.m,
                                                         "cell_bytes": e.layout.cell_bytes, "backend": e.backend}}
        pool = self.meta._pool
        assert pool is not None
        ch = await pool.get(mv.target.address)
        await ch.call("rebuild", args, timeout_s=60.0 + 3.0 * e.stored_length / max(rate, 1))

        def switch(c: Connection) -> None:
            res = c.execute(extent.update().where(extent.c.extent_id == e.extent_id,
                                                  extent.c.placement_epoch == e.epoch)
                            .values(placement_epoch=e.epoch + 1))
            if res.rowcount != 1:
                raise RpcError("conflict", f"extent {e.extent_id} was re-placed meanwhile")
            values = {"node_id": mv.target.node_id, "device_id": mv.target.device_id, "state": "ok", "reason": None}
            res = c.execute(replica.update().where(replica.c.extent_id == e.extent_id, replica.c.idx == mv.idx)
                            .values(**values))
            if res.rowcount == 0:
                c.execute(replica.insert().values(extent_id=e.extent_id, idx=mv.idx, **values))
        try:
            await self.meta._write(switch)
        except RpcError:
            if not mv.in_place:
                self._delete_later(mv.target.node_id, e.extent_id, 0.0)
            raise
        if mv.old is not None and not mv.in_place:
            self._delete_later(mv.old.node_id, e.extent_id, self.cfg.delete_grace_s)

    # ---- deletes and orphans --------------------------------------------------------

    def _delete_later(self, node_id: str, extent_id: int, after_s: float) -> None:
        self.deletes.append((trio.current_time() + after_s, node_id, extent_id))

    async def _do_deletes(self) -> None:
        now = trio.current_time()
        due = [d for d in self.deletes if d[0] <= now]
        self.deletes = [d for d in self.deletes if d[0] > now]
        for _, node_id, extent_id in due:
            await self._delete_if_unplaced(node_id, [extent_id])

    async def _delete_if_unplaced(self, node_id: str, extent_ids: list[int]) -> None:
        """Delete those of ``extent_ids`` on ``node_id`` that are sealed extents no replica row
        places there (and that no move is working on)."""
        live = self.meta.nodes.get(node_id)
        if live is None or not extent_ids:
            return

        def unplaced(c: Connection) -> list[int]:
            sealed = {int(r[0]) for r in c.execute(sa.select(extent.c.extent_id).where(
                extent.c.extent_id.in_(extent_ids), extent.c.state == "sealed"))}
            placed = {int(r[0]) for r in c.execute(sa.select(replica.c.extent_id).where(
                replica.c.extent_id.in_(extent_ids), replica.c.node_id == node_id))}
            return sorted(sealed - placed)
        pool = self.meta._pool
        assert pool is not None
        for extent_id in await self.meta._read(unplaced):
            if extent_id in self.running:
                continue
            try:
                ch = await pool.get(live.address)
                await ch.call("delete", {"extent_id": extent_id}, timeout_s=self.cfg.create_timeout_s)
                self.stats["orphans_deleted"] += 1
                log.info("deleted extent %d on %s: it is placed elsewhere now", extent_id, node_id)
            except (RpcError, ConnectionLost, trio.TooSlowError) as exc:
                log.warning("could not delete extent %d on %s: %s", extent_id, node_id, exc)

    async def _sweep_orphans(self, node_id: str) -> None:
        live = self.meta.nodes.get(node_id)
        pool = self.meta._pool
        if live is None or pool is None:
            return
        try:
            ch = await pool.get(live.address)
            result, _ = await ch.call("list", {}, timeout_s=self.cfg.create_timeout_s)
        except (RpcError, ConnectionLost, trio.TooSlowError) as exc:
            log.warning("orphan sweep of %s failed: %s", node_id, exc)
            self.sweep.add(node_id)
            return
        ids = [int(x["extent_id"]) for x in result["extents"] if x["state"] == "sealed"]
        for i in range(0, len(ids), 500):
            await self._delete_if_unplaced(node_id, ids[i:i + 500])

    async def _finish_drains(self, states: dict[str, tuple[str, str, str]], views: list[plan.ExtentView]) -> None:
        holding = {c.node_id for e in views for c in e.copies}
        draining = [nid for nid, (state, _, _) in states.items() if state == "draining" and nid not in holding]
        for node_id in draining:
            def done(c: Connection, node_id: str = node_id) -> bool:
                if c.execute(sa.select(replica.c.extent_id).where(replica.c.node_id == node_id).limit(1)).first():
                    return False  # an open extent still has a replica there
                c.execute(node.update().where(node.c.node_id == node_id, node.c.state == "draining")
                          .values(state="drained"))
                return True
            if await self.meta._write(done):
                log.info("node %s is drained: it holds no extent any more and can be removed", node_id)

    # ---- status ---------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "running": [
                    {"kind": m.kind, "extent_id": m.extent.extent_id, "idx": m.idx, "target": m.target.node_id,
                     "bytes": m.extent.stored_length, "reason": m.reason} for m in self.running.values()],
                "stuck": self.stuck[:20], "last_error": self.last_error, "imbalance": round(self.imbalance, 3),
                "limit_bytes_s": self.cfg.repair_bytes_s, **self.stats}


def _node_states(c: Connection) -> dict[str, tuple[str, str, str]]:
    return {r.node_id: (r.state, r.address, r.failure_domain)
            for r in c.execute(sa.select(node.c.node_id, node.c.state, node.c.address, node.c.failure_domain))}


__all__ = ["Maintainer", "extent_views"]
