"""The maintainer's planning rules (store/metanode/plan.py): repair, drain, rebalance, health."""

from __future__ import annotations

import random

from appendfs.store.ec import Layout
from appendfs.store.metanode.plan import (
    Copy,
    ExtentView,
    NodeView,
    health,
    imbalance,
    plan_rebalance,
    plan_repairs,
    stored_by_node,
)
from appendfs.store.placement import parse_policy

MiB = 1 << 20


def nodes(*ids: str, dead: tuple[str, ...] = (), down: tuple[str, ...] = (), draining: tuple[str, ...] = (),
          free: int = 100 << 30) -> dict[str, NodeView]:
    return {i: NodeView(i, f"127.0.0.1:{7100 + n}", i, f"{i}/0", 100 << 30, free, alive=i not in dead + down,
                        dead=i in dead, draining=i in draining) for n, i in enumerate(ids)}


def rep(extent_id: int, *holders: str, n: int = 3, states: dict[str, str] | None = None,
        length: int = 8 * MiB) -> ExtentView:
    states = states or {}
    return ExtentView(extent_id, 1, parse_policy(f"rep:{n}"), None, None, length, 1,
                      [Copy(i, h, states.get(h, "ok")) for i, h in enumerate(holders)])


def ec42(extent_id: int, *holders: str | None) -> ExtentView:
    return ExtentView(extent_id, 1, parse_policy("ec:4+2"), Layout(4, 2, 64 << 10), "isa_l_rs_cauchy", 4 * MiB, 1,
                      [Copy(i, h, "ok") for i, h in enumerate(holders) if h is not None])


def test_a_copy_on_a_dead_node_is_re_created_elsewhere_from_the_others() -> None:
    ns = nodes("a", "b", "c", "d", dead=("c",))
    moves, stuck = plan_repairs([rep(1, "a", "b", "c")], ns, random.Random(0))
    assert not stuck and len(moves) == 1
    mv = moves[0]
    assert (mv.kind, mv.idx, mv.target.node_id, mv.old and mv.old.node_id) == ("repair", 2, "d", "c")
    assert {s.node_id for s in mv.sources} == {"a", "b"}


def test_a_node_down_but_not_yet_dead_is_waited_for() -> None:
    ns = nodes("a", "b", "c", "d", down=("c",))
    e = rep(1, "a", "b", "c")
    assert plan_repairs([e], ns, random.Random(0)) == ([], [])
    assert health(e, ns) == "degraded"
    assert health(e, nodes("a", "b", "c", "d", dead=("c",))) == "under_replicated"
    assert health(e, nodes("a", "b", "c")) == "healthy"
    assert health(rep(2, "a", "b"), nodes("a", "b", "c")) == "under_replicated"  # never placed
    assert health(e, nodes("a", "b", "c", dead=("a", "b", "c"))) == "lost"


def test_a_degraded_write_gets_its_missing_slot_placed() -> None:
    moves, _ = plan_repairs([rep(1, "a", "b")], nodes("a", "b", "c"), random.Random(0))
    assert [(m.idx, m.old, m.target.node_id) for m in moves] == [(2, None, "c")]


def test_a_corrupt_copy_with_nowhere_else_to_go_is_rewritten_in_place() -> None:
    e = rep(1, "a", "b", "c", states={"b": "corrupt"})
    moves, _ = plan_repairs([e], nodes("a", "b", "c"), random.Random(0))
    assert len(moves) == 1 and moves[0].in_place and moves[0].target.node_id == "b"
    assert "b" not in {s.node_id for s in moves[0].sources}  # never read from the bad copy
    moves, _ = plan_repairs([e], nodes("a", "b", "c", "d"), random.Random(0))
    assert moves[0].target.node_id == "d" and not moves[0].in_place


def test_ec_repair_needs_k_sources_and_says_so_when_it_cannot() -> None:
    ns = nodes("a", "b", "c", "d", "e", "f", "g", dead=("a", "b"))
    moves, stuck = plan_repairs([ec42(1, "a", "b", "c", "d", "e", "f")], ns, random.Random(0))
    assert [m.idx for m in moves] == [0] and moves[0].target.node_id == "g"
    assert sorted(s.idx for s in moves[0].sources) == [2, 3, 4, 5]
    ns = nodes("a", "b", "c", "d", "e", "f", "g", dead=("a", "b", "c"))
    moves, stuck = plan_repairs([ec42(1, "a", "b", "c", "d", "e", "f")], ns, random.Random(0))
    assert moves == [] and stuck and "too few readable copies" in stuck[0]


def test_repairs_go_before_drains_and_the_nearest_to_loss_first() -> None:
    ns = nodes("a", "b", "c", "d", "e", "f", dead=("c", "b"), draining=("a",))
    safe = rep(1, "a", "d", "c")  # one copy gone
    risky = rep(2, "a", "b", "c")  # two gone
    drain_only = rep(3, "a", "d", "e")
    moves, _ = plan_repairs([safe, risky, drain_only], ns, random.Random(0))
    assert [(m.kind, m.extent.extent_id) for m in moves] == [("repair", 2), ("repair", 1), ("drain", 3)]


def test_drain_moves_every_copy_off_the_node_and_reads_from_it() -> None:
    ns = nodes("a", "b", "c", "d", draining=("a",))
    moves, _ = plan_repairs([rep(i, "a", "b", "c") for i in range(5)], ns, random.Random(0))
    assert len(moves) == 5 and all(m.kind == "drain" and m.target.node_id == "d" for m in moves)
    assert all(m.sources for m in moves)


def test_rebalance_onto_a_new_node_moves_about_the_minimum() -> None:
    extents = [rep(i, "a", "b", "c") for i in range(40)]
    ns = nodes("a", "b", "c", "d")
    spread = 0.1
    moves = plan_rebalance(extents, ns, spread, limit=1000)
    assert moves and all(m.target.node_id == "d" and m.kind == "rebalance" for m in moves)
    assert len({m.extent.extent_id for m in moves}) == len(moves)
    # apply them: every node within the spread, and no more moved than needed (+1 extent)
    for m in moves:
        m.extent.copies = [Copy(c.idx, "d", "ok") if c == m.old else c for c in m.extent.copies]
    stored = stored_by_node(extents)
    share = sum(stored.values()) / 4
    assert all(abs(v - share) <= spread * share + 8 * MiB for v in stored.values()), stored
    minimum = (1 - spread) * share
    assert stored["d"] <= minimum * 1.2 + 8 * MiB
    assert imbalance(extents, ns) <= spread + 8 * MiB / share


def test_a_balanced_cluster_moves_nothing_and_spread_zero_disables() -> None:
    extents = [rep(i, *("abcd"[(i + j) % 4] for j in range(3))) for i in range(40)]
    ns = nodes("a", "b", "c", "d")
    assert plan_rebalance(extents, ns, 0.1) == []
    lopsided = [rep(i, "a", "b", "c") for i in range(40)]
    assert plan_rebalance(lopsided, ns, 0.0) == []


def test_rebalance_skips_unhealthy_extents_and_draining_nodes() -> None:
    extents = [rep(i, "a", "b", "c") for i in range(10)]
    assert plan_rebalance(extents, nodes("a", "b", "c", "d", down=("a",)), 0.1) == []
    assert plan_rebalance(extents, nodes("a", "b", "c", "d", draining=("d",)), 0.1) == []
