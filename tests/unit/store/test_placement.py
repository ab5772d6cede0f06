"""Redundancy policies and weighted placement in distinct failure domains."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.store.placement import Candidate, Policy, PolicyError, choose, parse_policy


@pytest.mark.parametrize("n", range(1, 100))
def test_parse_rep(n: int) -> None:
    policy = parse_policy(f"rep:{n}")
    assert policy == Policy("rep", n)
    assert policy.width == n
    assert str(policy) == f"rep:{n}"


@pytest.mark.parametrize(("text", "k", "m"), [("ec:4+2", 4, 2), ("ec:1+1", 1, 1), ("ec:10+4", 10, 4),
                                              ("ec:99+99", 99, 99), (" ec:6+3\n", 6, 3)])
def test_parse_ec(text: str, k: int, m: int) -> None:
    policy = parse_policy(text)
    assert policy == Policy("ec", k, m)
    assert policy.width == k + m
    assert parse_policy(str(policy)) == policy


@pytest.mark.parametrize("text", [
    "", "rep", "rep:", "rep:0", "rep:100", "rep:-1", "rep:01", "rep:3x", "rep:3:", "REP:3", "rep: 3",
    "rep:\u0663", "rep:3.0", "ec:4", "ec:4+", "ec:+2", "ec:0+2", "ec:4+0", "ec:4-2", "ec:100+1", "ec:4+2+1",
    "mirror:2", "rep:3\nrep:2", "ec:\uff14+2",
])
def test_parse_rejects_junk(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


@given(st.text(max_size=12))
@settings(max_examples=200, deadline=None)
def test_parse_accepts_only_canonical_forms(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError:
        return
    assert str(policy) == text.strip()


@pytest.mark.parametrize(("policy", "expected"), [("rep:1", 1), ("rep:2", 1), ("rep:3", 2), ("rep:5", 4),
                                                  ("ec:4+2", 5), ("ec:2+1", 3), ("ec:10+4", 13)])
def test_write_min_default(policy: str, expected: int) -> None:
    # DESIGN §7: N-1 by default, at least 1; EC one fragment missing at most, never below K+1.
    assert parse_policy(policy).write_min() == expected


def test_ec_write_min_follows_ec_missing_max() -> None:
    ec42 = parse_policy("ec:4+2")
    assert ec42.write_min(ec_missing_max=0) == 6
    assert ec42.write_min(ec_missing_max=2) == 5  # never fewer than K+1


def test_write_min_configured_is_clamped() -> None:
    rep3 = parse_policy("rep:3")
    assert rep3.write_min(3) == 3
    assert rep3.write_min(1) == 1
    assert rep3.write_min(0) == 1
    assert rep3.write_min(10) == 3


# ---- choose ---------------------------------------------------------------------------


def cand(i: int, *, domain: str | None = None, free: int = 1000, node: str | None = None) -> Candidate:
    node = node or f"n{i}"
    return Candidate(f"d{i}", node, f"127.0.0.1:{7000 + i}", domain or node, free)


candidates_st = st.lists(
    st.builds(lambda i, d, f, n: cand(i, domain=f"dom{d}", free=f, node=f"n{n}"),
              st.integers(0, 10**6), st.integers(0, 5), st.integers(0, 10**12), st.integers(0, 8)),
    max_size=12, unique_by=lambda c: c.device_id)


@given(candidates_st, st.integers(0, 8), st.integers(0, 2**32), st.frozensets(st.sampled_from(
    [f"n{i}" for i in range(9)]), max_size=4))
@settings(max_examples=100, deadline=None)
def test_choose_invariants(cands: list[Candidate], count: int, seed: int, avoid: frozenset[str]) -> None:
    picks = choose(cands, count, random.Random(seed), avoid)
    domains = [p.failure_domain for p in picks]
    assert len(set(domains)) == len(domains), "two picks in one failure domain"
    assert len(picks) <= count
    assert all(p in cands and p.free_bytes > 0 for p in picks)
    # As many as possible: stops short only when no usable domain is left.
    usable_domains = {c.failure_domain for c in cands if c.free_bytes > 0}
    assert len(picks) == min(count, len(usable_domains))
    # Avoided nodes only fill in after every other usable domain is used.
    preferred_domains = {c.failure_domain for c in cands if c.free_bytes > 0 and c.node_id not in avoid}
    first_avoided = next((i for i, p in enumerate(picks) if p.node_id in avoid), len(picks))
    assert first_avoided >= min(count, len(preferred_domains))
    assert all(p.node_id not in avoid for p in picks[:first_avoided])


def test_choose_avoids_nodes_unless_nothing_else() -> None:
    cands = [cand(i) for i in range(4)]
    for seed in range(50):
        picks = choose(cands, 3, random.Random(seed), frozenset({"n0"}))
        assert {p.node_id for p in picks} == {"n1", "n2", "n3"}
        picks = choose(cands, 4, random.Random(seed), frozenset({"n0"}))
        assert {p.node_id for p in picks} == {"n0", "n1", "n2", "n3"}
        assert picks[-1].node_id == "n0"


def test_choose_skips_full_devices_and_shared_domains() -> None:
    cands = [cand(0, free=0), cand(1, domain="rack-a"), cand(2, domain="rack-a"), cand(3, domain="rack-b")]
    for seed in range(50):
        picks = choose(cands, 3, random.Random(seed))
        assert len(picks) == 2
        assert sorted(p.failure_domain for p in picks) == ["rack-a", "rack-b"]
    assert choose([], 3, random.Random(0)) == []
    assert choose(cands, 0, random.Random(0)) == []


def test_choose_weights_by_free_bytes() -> None:
    # A seeded generator makes this exact and repeatable; the bounds are ~10 sigma wide.
    cands = [cand(0, free=1 << 30), cand(1, free=3 << 30), cand(2, free=6 << 30)]
    rng = random.Random(20240601)
    trials = 20_000
    counts = Counter(choose(cands, 1, rng)[0].device_id for _ in range(trials))
    for device, share in (("d0", 0.1), ("d1", 0.3), ("d2", 0.6)):
        assert abs(counts[device] / trials - share) < 0.035, counts


def test_choose_second_pick_weighted_among_remaining() -> None:
    cands = [cand(0, free=100), cand(1, free=100), cand(2, free=800)]
    rng = random.Random(5)
    trials = 10_000
    pairs = Counter(frozenset(p.device_id for p in choose(cands, 2, rng)) for _ in range(trials))
    # P(d0,d1) = P(d0 first)*P(d1|...) + P(d1 first)*P(d0|...) = 2 * 0.1 * (100/900) ~= 0.022
    assert pairs[frozenset({"d0", "d1"})] / trials < 0.05
    assert pairs[frozenset({"d0", "d2"})] / trials > 0.4
