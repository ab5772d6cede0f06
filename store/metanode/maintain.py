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
import random
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection

from appendfs.store import ec
from appendfs.store.metanode import plan
from appendfs.store.metanode.schema import extent, node, replica, stream
from appendfs.store.placement import local_id, logical_id, parse_policy
from appendfs.store.rpc import ConnectionLost, RpcError

if TYPE_CHECKING:
    from appendfs.store.metanode.service import MetaNode

log = logging.getLogger(__name__)


def extent_views(c: Connection, where: Any = None) -> list[plan.ExtentView]:
    """Every sealed extent (or those matching ``where``) with its copies, in one query."""
    q = (sa.select(extent.c.extent_id, extent.c.stream_id, extent.c.redundancy, extent.c.ec_backend,
                   extent.c.ec_cell_bytes, extent.c.sealed_length, extent.c.placement_epoch, extent.c.local_id,
                   stream.c.redundancy.label("stream_redundancy"), stream.c.ec_backend.label("stream_backend"),
                   stream.c.ec_cell_bytes.label("stream_cell_bytes"),
                   replica.c.idx, replica.c.node_id, replica.c.state)
         .select_from(extent.join(stream, stream.c.stream_id == extent.c.stream_id)
                      .outerjoin(replica, replica.c.extent_id == extent.c.extent_id))
         .where(extent.c.state == "sealed" if where is None else where)
         .order_by(extent.c.extent_id))
    views: dict[int, plan.ExtentView] = {}
    for r in c.execute(q):
        v = views.get(r.extent_id)
        if v is None:
            policy = parse_policy(r.redundancy)
            layout = None if r.ec_backend is None else ec.Layout(policy.data, policy.parity, int(r.ec_cell_bytes))
            then = parse_policy(r.stream_redundancy).then
            v = views[r.extent_id] = plan.ExtentView(
                int(r.extent_id), int(r.stream_id), policy, layout, r.ec_backend, int(r.sealed_length or 0),
                int(r.placement_epoch), local_id=int(r.local_id if r.local_id is not None else r.extent_id),
                then=then, then_backend=r.stream_backend if then else None,
                then_cell_bytes=int(r.stream_cell_bytes) if then and r.stream_cell_bytes else None)
        if r.idx is not None:
            v.copies.append(plan.Copy(int(r.idx), r.node_id, r.state))
    return list(views.values())


class Maintainer:
    def __init__(self, meta: MetaNode) -> None:
        self.meta = meta
        self.cfg = meta.cfg
        self.rng = random.Random()
        self.queue: list[plan.Move | plan.Transcode] = []
        self.running: dict[int, plan.Move | plan.Transcode] = {}  # extent id → move in progress
        self.deletes: list[tuple[float, str, int]] = []  # (due, node id, DataNode id of the copy)
        self.sweep: set[str] = set()  # nodes whose orphans to delete
        self.stuck: list[str] = []
        self.imbalance = 0.0
        self.wake = trio.Event()
        self.stats = {"repairs": 0, "drain_moves": 0, "rebalance_moves": 0, "transcodes": 0, "moved_bytes": 0,
                      "move_failures": 0, "orphans_deleted": 0}
        self.last_error: str | None = None
        self.backoff: dict[int, tuple[float, int]] = {}  # extent id → (not before, failures in a row)

    # ---- the loop -------------------------------------------------------------------

    async def run(self) -> None:
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
        # Extents with a move running when the views are read stay busy this round even if the
        # move ends during the read: the views may predate its switch, and planning from
        # them would run the same transcode or move a second time over its live result.
        running_before = set(self.running)
        views, states = await self.meta._read(lambda c: (extent_views(c), _node_states(c)))
        self.meta.node_states = states
        nodes = self.node_views(states)
        now = trio.current_time()
        self.backoff = {e: b for e, b in self.backoff.items() if b[0] > now - 600}
        busy = frozenset(running_before | set(self.running)) | {e for e, (until, _) in self.backoff.items()
                                                                 if until > now}
        moves, self.stuck = plan.plan_repairs(views, nodes, self.rng, skip=busy)
        work: list[plan.Move | plan.Transcode] = list(moves)
        if not work:
            transcodes, stuck = plan.plan_transcodes(views, nodes, self.rng, skip=busy)
            work, self.stuck = list(transcodes), self.stuck + stuck
        if work:
            self.queue = work
        elif self.running:  # rebalance moves were planned together: finish them before replanning
            self.queue = [m for m in self.queue if m.kind == "rebalance"]
        else:
            self.queue = [m for m in plan.plan_rebalance(views, nodes, self.cfg.rebalance_spread)
                          if m.extent.extent_id not in busy]
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

    async def _work(self, mv: plan.Move | plan.Transcode, free: trio.Semaphore) -> None:
        e = mv.extent
        try:
            if isinstance(mv, plan.Transcode):
                await self._transcode(mv)
                self.stats["transcodes"] += 1
                self.stats["moved_bytes"] += e.sealed_length
                log.info("transcoded extent %d to %s on %s", e.extent_id, e.then,
                         " ".join(t.node_id for t in mv.targets))
            else:
                await self._move(mv)
                self.stats["repairs" if mv.kind == "repair" else f"{mv.kind}_moves"] += 1
                self.stats["moved_bytes"] += e.stored_length
                log.info("%s: extent %d slot %d now on %s (%s)%s", mv.kind, e.extent_id, mv.idx, mv.target.node_id,
                         mv.reason, " in place" if mv.in_place else "")
            self.backoff.pop(e.extent_id, None)
        except (RpcError, ConnectionLost, trio.TooSlowError) as exc:
            # Not again at once: the next round would plan the same move (maybe to the same
            # unreachable node) in a tight loop. 1, 2, 4 ... 60 s.
            failures = self.backoff.get(e.extent_id, (0.0, 0))[1] + 1
            self.backoff[e.extent_id] = (trio.current_time() + min(60.0, 2.0 ** (failures - 1)), failures)
            self.stats["move_failures"] += 1
            where = "" if isinstance(mv, plan.Transcode) else f" slot {mv.idx} to {mv.target.node_id}"
            self.last_error = f"{mv.kind} of extent {e.extent_id}{where}: {exc}"
            log.error("%s", self.last_error)
        finally:
            del self.running[e.extent_id]
            free.release()
            self.wake.set()

    @property
    def _rate(self) -> int:
        """Source bytes/s each move may read: all moves together stay under repair_bytes_s."""
        return int(self.cfg.repair_bytes_s / self.cfg.repair_parallel)

    def _peers(self, copies: list[plan.Copy]) -> list[dict[str, Any]]:
        """The request's ``sources``: the copies on nodes we hear from, with their addresses."""
        addresses = {n.node_id: n.address for n in self.meta.nodes.values()}
        return [{"idx": c.idx, "node_id": c.node_id, "address": addresses[c.node_id]}
                for c in copies if c.node_id in addresses]

    async def _job(self, address: str, op: str, args: dict[str, Any], nbytes: int) -> None:
        """Run a ``rebuild`` / ``transcode`` on a DataNode; the deadline follows the rate."""
        pool = self.meta._pool
        assert pool is not None
        ch = await pool.get(address)
        await ch.call(op, args, timeout_s=60.0 + 3.0 * nbytes / max(self._rate, 1))

    async def _move(self, mv: plan.Move) -> None:
        e = mv.extent
        args = {"extent_id": e.local_id, "logical_id": e.extent_id, "stream_id": e.stream_id, "epoch": e.epoch + 1,
                "index": mv.idx, "length": e.stored_length, "rate_bytes_s": self._rate,
                "sources": self._peers(mv.sources),
                "layout": None if e.layout is None else {"k": e.layout.k, "m": e.layout.m,
                                                         "cell_bytes": e.layout.cell_bytes, "backend": e.backend}}
        await self._job(mv.target.address, "rebuild", args, e.stored_length)

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
                self._delete_later(mv.target.node_id, e.local_id, 0.0)
            raise
        if mv.old is not None and not mv.in_place:
            self._delete_later(mv.old.node_id, e.local_id, self.cfg.delete_grace_s)

    async def _transcode(self, tc: plan.Transcode) -> None:
        """Encode a replicated extent into K+M fragments (a replica holder coordinates: it
        reads the bytes once), then switch the extent to EC in one transaction."""
        e, then = tc.extent, tc.extent.then
        assert then is not None and e.then_backend is not None and e.then_cell_bytes is not None
        new_id = local_id(e.extent_id, 1)
        sources = self._peers(tc.sources)
        if not sources:
            raise RpcError("unavailable", f"no live replica of extent {e.extent_id} to transcode from")
        args = {"extent_id": e.extent_id, "stream_id": e.stream_id, "epoch": e.epoch + 1, "length": e.sealed_length,
                "read_id": e.local_id, "local_id": new_id, "rate_bytes_s": self._rate, "sources": sources,
                "targets": [{"idx": i, "node_id": t.node_id, "address": t.address} for i, t in enumerate(tc.targets)],
                "layout": {"k": then.data, "m": then.parity, "cell_bytes": e.then_cell_bytes,
                           "backend": e.then_backend}}
        try:
            await self._job(str(sources[0]["address"]), "transcode", args, e.sealed_length)
        except (RpcError, ConnectionLost, trio.TooSlowError):
            # Fragments the job sealed before it failed stay on their nodes (the job only
            # removes unsealed ones); these deletes skip any a duplicate job got placed.
            for t in tc.targets:
                self._delete_later(t.node_id, new_id, 0.0)
            raise

        def switch(c: Connection) -> None:
            res = c.execute(extent.update().where(extent.c.extent_id == e.extent_id,
                                                  extent.c.placement_epoch == e.epoch,
                                                  extent.c.redundancy == str(e.policy))
                            .values(placement_epoch=e.epoch + 1, redundancy=str(then), ec_backend=e.then_backend,
                                    ec_cell_bytes=e.then_cell_bytes, local_id=new_id))
            if res.rowcount != 1:
                raise RpcError("conflict", f"extent {e.extent_id} was re-placed meanwhile")
            c.execute(replica.delete().where(replica.c.extent_id == e.extent_id))
            for i, t in enumerate(tc.targets):
                c.execute(replica.insert().values(extent_id=e.extent_id, idx=i, node_id=t.node_id,
                                                  device_id=t.device_id, state="ok", reason=None))
        try:
            await self.meta._write(switch)
        except RpcError:
            for t in tc.targets:
                self._delete_later(t.node_id, new_id, 0.0)
            raise
        for c in e.copies:  # the replicas, once readers with the old map are done with them
            self._delete_later(c.node_id, e.local_id, self.cfg.delete_grace_s)

    # ---- deletes and orphans --------------------------------------------------------

    def _delete_later(self, node_id: str, extent_id: int, after_s: float) -> None:
        self.deletes.append((trio.current_time() + after_s, node_id, extent_id))

    async def _do_deletes(self) -> None:
        now = trio.current_time()
        due = [d for d in self.deletes if d[0] <= now]
        self.deletes = [d for d in self.deletes if d[0] > now]
        for _, node_id, extent_id in due:
            await self._delete_if_unplaced(node_id, [extent_id])

    async def _delete_if_unplaced(self, node_id: str, ids: list[int]) -> None:
        """Delete the copies ``ids`` (DataNode ids) on ``node_id`` that belong to sealed extents
        but are not in use there: no replica row places the extent on that node, or the
        extent's copies are stored under another id now (a replica after transcoding). Copies
        of extents a move is working on are left alone."""
        live = self.meta.nodes.get(node_id)
        if live is None or not ids:
            return
        logical = {i: logical_id(i) for i in ids}

        def unplaced(c: Connection) -> list[int]:
            current = {int(r[0]): int(r[1]) for r in c.execute(
                sa.select(extent.c.extent_id, sa.func.coalesce(extent.c.local_id, extent.c.extent_id))
                .where(extent.c.extent_id.in_(set(logical.values())), extent.c.state == "sealed"))}
            placed = {int(r[0]) for r in c.execute(sa.select(replica.c.extent_id).where(
                replica.c.extent_id.in_(set(logical.values())), replica.c.node_id == node_id))}
            return sorted(i for i, e in logical.items() if e in current and (e not in placed or current[e] != i))
        pool = self.meta._pool
        assert pool is not None
        for local in await self.meta._read(unplaced):
            if logical[local] in self.running:
                continue
            try:
                ch = await pool.get(live.address)
                await ch.call("delete", {"extent_id": local}, timeout_s=self.cfg.create_timeout_s)
                self.stats["orphans_deleted"] += 1
                log.info("deleted copy %x of extent %d on %s: not in use there any more", local, logical[local],
                         node_id)
            except (RpcError, ConnectionLost, trio.TooSlowError) as exc:
                log.warning("could not delete copy %x on %s: %s", local, node_id, exc)

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
        def one(m: plan.Move | plan.Transcode) -> dict[str, Any]:
            if isinstance(m, plan.Transcode):
                return {"kind": m.kind, "extent_id": m.extent.extent_id, "idx": None,
                        "target": ",".join(t.node_id for t in m.targets), "bytes": m.extent.sealed_length,
                        "reason": f"{m.extent.policy} -> {m.extent.then}"}
            return {"kind": m.kind, "extent_id": m.extent.extent_id, "idx": m.idx, "target": m.target.node_id,
                    "bytes": m.extent.stored_length, "reason": m.reason}
        return {"queued": len(self.queue), "running": [one(m) for m in self.running.values()],
                "stuck": self.stuck[:20], "last_error": self.last_error, "imbalance": round(self.imbalance, 3),
                "limit_bytes_s": self.cfg.repair_bytes_s, **self.stats}


def _node_states(c: Connection) -> dict[str, tuple[str, str, str]]:
    return {r.node_id: (r.state, r.address, r.failure_domain)
            for r in c.execute(sa.select(node.c.node_id, node.c.state, node.c.address, node.c.failure_domain))}


__all__ = ["Maintainer", "extent_views"]
