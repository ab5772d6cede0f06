"""What the leader's maintainer should do next: repair, drain and rebalance plans — pure code.

The MetaNode's :mod:`.maintain` loop reads the placement of every sealed extent and what it
knows of the DataNodes, turns them into the views below, and asks this module for
*moves*. A move re-creates one replica (``rep:N``) or fragment (``ec:K+M``, index = ``idx``)
of one sealed extent on a target DataNode from healthy sources; the DataNode ``rebuild``
request does the bytes, and one transaction then repoints the replica row and bumps the
extent's placement epoch. Nothing here does I/O, so every rule is unit-tested alone.

Three kinds, in priority order:

* **repair** — a slot (index ``0 .. width-1``) has no usable copy for good: never placed
  (a degraded write), reported ``corrupt`` or ``missing``, or on a DataNode declared dead
  (silent longer than ``repair_after_s``) or removed. Extents closest to loss go first.
  A corrupt copy on a live node with no other place to go is rewritten *in place*.
* **drain** — a slot is on a DataNode being drained: copied away while it still serves.
* **transcode** — a sealed, healthy extent of a ``rep:N>ec:K+M`` stream still replicated
  is encoded into K+M fragments on K+M nodes (distinct failure domains; nodes holding a
  replica may take a fragment: fragments are stored under another DataNode id,
  ``placement.local_id(extent, 1)``), then switched to EC in one transaction.
* **rebalance** — only when there is no repair, drain or transcode work: sealed, healthy extents move
  from the DataNodes above their share of the stored bytes to those below, until every
  node is within ``spread`` of its share (share = total * its capacity / all capacity).
  Each move goes from the most-over to the most-under node and is taken only if it
  reduces their imbalance, so the bytes moved stay close to the minimum needed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from appendfs.store.ec import Layout
from appendfs.store.placement import Candidate, Policy, choose

#: Replica states that hold no usable copy (``unsealed`` is still a copy: reconcile seals it).
GONE_STATES = frozenset({"corrupt", "missing"})


@dataclass(frozen=True)
class Copy:
    """One replica / fragment row."""

    idx: int
    node_id: str
    state: str


@dataclass
class ExtentView:
    """A sealed extent and where its copies are."""

    extent_id: int
    stream_id: int
    policy: Policy
    layout: Layout | None
    backend: str | None  # EC only: the recorded pyeclib backend
    sealed_length: int
    epoch: int
    copies: list[Copy] = field(default_factory=list)
    local_id: int = -1  # the id DataNodes store its copies under (its own id until transcoded)
    then: Policy | None = None  # rep:N>ec:K+M streams: the EC policy it is to be transcoded to
    then_backend: str | None = None
    then_cell_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.local_id < 0:
            self.local_id = self.extent_id

    @property
    def to_transcode(self) -> bool:
        return self.then is not None and self.policy.kind == "rep" and self.then.kind == "ec"

    @property
    def stored_length(self) -> int:
        """Bytes each copy holds (a fragment holds whole records)."""
        return self.sealed_length if self.layout is None else self.layout.fragment_length(self.sealed_length)

    @property
    def needed(self) -> int:
        """Copies needed to read it: one replica, or any K fragments."""
        return self.policy.data if self.policy.kind == "ec" else 1


@dataclass(frozen=True)
class NodeView:
    """A DataNode as the maintainer sees it."""

    node_id: str
    address: str
    failure_domain: str
    device_id: str
    capacity_bytes: int
    free_bytes: int
    alive: bool  # heartbeating now
    dead: bool  # silent past repair_after_s, or removed: its copies are gone for good
    draining: bool = False
    full: bool = False

    @property
    def takes_new(self) -> bool:
        return self.alive and not self.dead and not self.draining and not self.full


@dataclass
class Move:
    """Re-create slot ``idx`` of ``extent`` on ``target`` from ``sources``."""

    kind: str  # "repair", "drain" or "rebalance"
    extent: ExtentView
    idx: int
    old: Copy | None  # the copy being replaced (None: the slot was never placed)
    target: NodeView
    sources: list[Copy]
    reason: str

    @property
    def in_place(self) -> bool:
        return self.old is not None and self.old.node_id == self.target.node_id


def usable(c: Copy, nodes: dict[str, NodeView]) -> bool:
    """A copy a reader (or a rebuild) can use right now."""
    n = nodes.get(c.node_id)
    return c.state in ("ok", "unsealed") and n is not None and n.alive and not n.dead


def slot_problem(c: Copy | None, nodes: dict[str, NodeView]) -> str | None:
    """Why this slot needs a new copy for good (repair), or None."""
    if c is None:
        return "never placed"
    if c.state in GONE_STATES:
        return f"replica {c.state}"
    n = nodes.get(c.node_id)
    if n is None or n.dead:
        return f"node {c.node_id} is dead"
    return None


def health(e: ExtentView, nodes: dict[str, NodeView]) -> str:
    """``healthy``, ``degraded`` (a copy is on a node that is down but not yet declared
    dead: it may come back, repair waits), ``under_replicated`` (a copy is gone for good:
    repair re-creates it) or ``lost`` (fewer usable copies than a read needs)."""
    slots = {c.idx: c for c in e.copies}
    if sum(1 for c in e.copies if usable(c, nodes)) < e.needed:
        return "lost"
    problems = [slot_problem(slots.get(i), nodes) for i in range(e.policy.width)]
    if any(problems):
        return "under_replicated"
    if all(c.state == "ok" and usable(c, nodes) for c in e.copies):
        return "healthy"
    return "degraded"


def _sources(e: ExtentView, nodes: dict[str, NodeView], exclude: Copy | None) -> list[Copy]:
    """Usable copies to read from, the ``ok`` ones first; for EC the same index first
    (verbatim copy), then data fragments, then parity."""
    out = [c for c in e.copies if usable(c, nodes) and c is not exclude]
    k = e.policy.data
    return sorted(out, key=lambda c: (c.state != "ok", c.idx >= k, c.idx))


def _readable(e: ExtentView, sources: Sequence[Copy], idx: int) -> bool:
    if e.layout is None:
        return bool(sources)
    return any(c.idx == idx for c in sources) or len({c.idx for c in sources}) >= e.policy.data


def _target(e: ExtentView, nodes: dict[str, NodeView], replaced: Copy | None, rng: random.Random) -> NodeView | None:
    """A node for a new copy: takes new extents, holds no other copy of this extent, in a
    failure domain no other copy uses; weighted by free space."""
    others = [c for c in e.copies if c is not replaced]
    holders = {c.node_id for c in e.copies}
    domains = {nodes[c.node_id].failure_domain for c in others if c.node_id in nodes and not nodes[c.node_id].dead}
    cands = [Candidate(n.device_id, n.node_id, n.address, n.failure_domain, n.free_bytes)
             for n in nodes.values()
             if n.takes_new and n.node_id not in holders and n.failure_domain not in domains
             and n.free_bytes > e.stored_length]
    chosen = choose(sorted(cands, key=lambda c: c.node_id), 1, rng)
    return nodes[chosen[0].node_id] if chosen else None


def plan_repairs(extents: Iterable[ExtentView], nodes: dict[str, NodeView], rng: random.Random,
                 skip: frozenset[int] = frozenset(), limit: int = 256) -> tuple[list[Move], list[str]]:
    """Repair and drain moves (at most ``limit``; repairs first, fewest usable copies
    first), and one line for each slot that needs a copy but has nowhere to go."""
    repairs: list[tuple[int, Move]] = []
    drains: list[Move] = []
    stuck: list[str] = []
    for e in extents:
        if e.extent_id in skip:
            continue
        slots = {c.idx: c for c in e.copies}
        have = sum(1 for c in e.copies if usable(c, nodes))
        todo = [(idx, "repair", why) for idx in range(e.policy.width)
                if (why := slot_problem(slots.get(idx), nodes)) is not None]
        if not todo:  # drain only an extent that lacks nothing else
            todo = [(c.idx, "drain", f"node {c.node_id} is draining") for c in e.copies
                    if c.state == "ok" and c.node_id in nodes and nodes[c.node_id].draining]
        for idx, kind, why in todo:
            old = slots.get(idx)
            exclude = old if why.startswith("replica") else None  # a corrupt copy is no source
            sources = _sources(e, nodes, exclude)
            if not _readable(e, sources, idx):
                stuck.append(f"extent {e.extent_id} slot {idx}: {why}, but too few readable copies to rebuild from")
                break
            target = _target(e, nodes, old, rng)
            if target is None and kind == "repair" and old is not None and old.state == "corrupt":
                n = nodes.get(old.node_id)
                if n is not None and n.alive and not n.dead and not n.draining:
                    target = n  # rewrite the bad copy where it is
            if target is None:
                stuck.append(f"extent {e.extent_id} slot {idx}: {why}, no DataNode can take a copy")
                continue
            move = Move(kind, e, idx, old, target, sources, why)
            if kind == "repair":
                repairs.append((have, move))
            else:
                drains.append(move)
            break  # one move per extent per round: the next round sees the new placement
    repairs.sort(key=lambda hm: (hm[0] - hm[1].extent.needed, hm[1].extent.extent_id))
    return ([m for _, m in repairs] + drains)[:limit], stuck


@dataclass
class Transcode:
    """Encode replicated ``extent`` into fragments ``targets[i]`` = fragment i."""

    extent: ExtentView
    targets: list[NodeView]
    sources: list[Copy]
    kind: str = "transcode"


def plan_transcodes(extents: Iterable[ExtentView], nodes: dict[str, NodeView], rng: random.Random,
                    skip: frozenset[int] = frozenset(), limit: int = 64) -> tuple[list[Transcode], list[str]]:
    """Transcodes of healthy sealed extents of ``rep:N>ec:K+M`` streams (oldest first), and a
    line for each that has too few DataNodes to go to."""
    out: list[Transcode] = []
    stuck: list[str] = []
    cands = [Candidate(n.device_id, n.node_id, n.address, n.failure_domain, n.free_bytes)
             for n in sorted(nodes.values(), key=lambda n: n.node_id) if n.takes_new]
    for e in extents:
        if len(out) >= limit:
            break
        if not e.to_transcode or e.extent_id in skip or health(e, nodes) != "healthy":
            continue
        assert e.then is not None
        chosen = choose(cands, e.then.width, rng)
        if len(chosen) < e.then.width:
            stuck.append(f"extent {e.extent_id}: {e.then} needs {e.then.width} DataNodes in distinct failure "
                         f"domains, {len(chosen)} can take fragments")
            continue
        out.append(Transcode(e, [nodes[c.node_id] for c in chosen], _sources(e, nodes, None)))
    return out, stuck


def stored_by_node(extents: Iterable[ExtentView]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in extents:
        for c in e.copies:
            out[c.node_id] = out.get(c.node_id, 0) + e.stored_length
    return out


def shares(stored: dict[str, int], nodes: Sequence[NodeView]) -> dict[str, float]:
    """Each balanced node's share of all stored bytes, by capacity."""
    total = sum(stored.get(n.node_id, 0) for n in nodes)
    cap = sum(n.capacity_bytes for n in nodes) or 1
    return {n.node_id: total * n.capacity_bytes / cap for n in nodes}


def imbalance(extents: Sequence[ExtentView], nodes: dict[str, NodeView]) -> float:
    """The largest deviation of a balanced node from its share, as a fraction of it."""
    pool = [n for n in nodes.values() if n.takes_new]
    stored = stored_by_node(extents)
    target = shares(stored, pool)
    worst = 0.0
    for n in pool:
        if target[n.node_id] > 0:
            worst = max(worst, abs(stored.get(n.node_id, 0) - target[n.node_id]) / target[n.node_id])
    return worst


def plan_rebalance(extents: Sequence[ExtentView], nodes: dict[str, NodeView], spread: float,
                   limit: int = 64) -> list[Move]:
    """Moves of healthy sealed extents from over- to under-used nodes (see the module doc)."""
    pool = {n.node_id: n for n in nodes.values() if n.takes_new}
    if len(pool) < 2 or spread <= 0:
        return []
    stored = stored_by_node(extents)
    target = shares(stored, list(pool.values()))
    movable = [e for e in extents if health(e, nodes) == "healthy" and e.stored_length > 0]
    on: dict[str, list[ExtentView]] = {nid: [] for nid in pool}
    for e in movable:
        for c in e.copies:
            if c.node_id in on:
                on[c.node_id].append(e)
    for lst in on.values():
        lst.sort(key=lambda e: -e.stored_length)
    moved: set[int] = set()
    moves: list[Move] = []
    while len(moves) < limit:
        dev = {nid: stored.get(nid, 0) - target[nid] for nid in pool}
        hi = max(dev, key=lambda nid: (dev[nid], nid))
        lo = min(dev, key=lambda nid: (dev[nid], nid))
        if max(dev[hi] / (target[hi] or 1), -dev[lo] / (target[lo] or 1)) <= spread:
            break
        pick = None
        for e in on[hi]:
            if e.extent_id in moved:
                continue
            holders = {c.node_id for c in e.copies}
            domains = {nodes[c.node_id].failure_domain for c in e.copies if c.node_id != hi and c.node_id in nodes}
            if lo in holders or pool[lo].failure_domain in domains or pool[lo].free_bytes <= e.stored_length:
                continue
            s = e.stored_length
            # worth it only if the pair ends closer to balance than it is
            if max(abs(dev[hi] - s), abs(dev[lo] + s)) >= max(dev[hi], -dev[lo]):
                continue
            pick = e
            break
        if pick is None:
            break
        old = next(c for c in pick.copies if c.node_id == hi)
        sources = [old, *_sources(pick, nodes, old)]  # the copy itself first: a verbatim copy
        moves.append(Move("rebalance", pick, old.idx, old, pool[lo], sources, f"node {hi} above its share"))
        moved.add(pick.extent_id)
        stored[hi] = stored.get(hi, 0) - pick.stored_length
        stored[lo] = stored.get(lo, 0) + pick.stored_length
    return moves
