"""Redundancy policies and replica placement — pure code, no I/O (randomness is passed in).

A policy string is ``rep:N`` (N full replicas), ``ec:K+M`` (K data + M parity fragments,
one per device; store/ec.py holds the layout) or ``rep:N>ec:K+M`` (write replicated, keep
erasure-coded once sealed: the MetaNode's maintainer transcodes sealed extents). Placement
picks devices by weighted random choice (weight = free bytes) among healthy devices, at
most one per failure domain, so replicas never share a node (or rack, when configured).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_REP = re.compile(r"^rep:([1-9][0-9]?)$")
_EC = re.compile(r"^ec:([1-9][0-9]?)\+([1-9][0-9]?)$")
_THEN = re.compile(r"^(rep:[1-9][0-9]?)\s*>\s*(ec:[1-9][0-9]?\+[1-9][0-9]?)$")


class PolicyError(ValueError):
    """A redundancy policy string is malformed or out of range."""


@dataclass(frozen=True)
class Policy:
    kind: str  # "rep" or "ec": how extents are written
    data: int  # N for rep, K for ec
    parity: int = 0  # M for ec
    then: Policy | None = None  # rep:N>ec:K+M: what sealed extents become (transcoding)

    @property
    def write(self) -> Policy:
        """The policy extents are written with (``rep:N`` of ``rep:N>ec:K+M``)."""
        return Policy(self.kind, self.data, self.parity) if self.then is not None else self

    @property
    def final(self) -> Policy:
        """What sealed extents end as: ``then`` when transcoding, else the policy itself."""
        return self.then if self.then is not None else self

    @property
    def width(self) -> int:
        """How many devices one extent spans."""
        return self.data + self.parity if self.kind == "ec" else self.data

    def write_min(self, configured: int | None = None, ec_missing_max: int = 1) -> int:
        """Fewest devices an extent may be placed on (DESIGN §7 degraded writes): for EC at
        most ``ec_missing_max`` fragments missing and never fewer than K+1 placed, so one
        more failure during the write loses nothing; repair places the rest once sealed."""
        if self.kind == "ec":
            return max(self.data + 1, self.width - ec_missing_max)
        if configured is not None:
            return max(1, min(configured, self.data))
        return max(1, self.data - 1)

    def __str__(self) -> str:
        own = f"ec:{self.data}+{self.parity}" if self.kind == "ec" else f"rep:{self.data}"
        return own if self.then is None else f"{own}>{self.then}"


def parse_policy(text: str) -> Policy:
    text = text.strip()
    if m := _THEN.match(text):
        first, then = parse_policy(m.group(1)), parse_policy(m.group(2))
        return Policy(first.kind, first.data, first.parity, then)
    if m := _REP.match(text):
        return Policy("rep", int(m.group(1)))
    if m := _EC.match(text):
        return Policy("ec", int(m.group(1)), int(m.group(2)))
    raise PolicyError(f"redundancy {text!r} is not rep:N, ec:K+M or rep:N>ec:K+M")


#: DataNode ids of extent copies: the logical extent id in the low bits, a generation above.
LOCAL_ID_SHIFT = 48


def local_id(extent_id: int, generation: int) -> int:
    """The id copies of ``extent_id`` are stored under on DataNodes in ``generation`` (0: as
    written; 1: transcoded). Distinct ids let one node hold both during the switch."""
    return extent_id | (generation << LOCAL_ID_SHIFT)


def logical_id(local: int) -> int:
    return local & ((1 << LOCAL_ID_SHIFT) - 1)


@dataclass(frozen=True)
class Candidate:
    device_id: str
    node_id: str
    address: str
    failure_domain: str
    free_bytes: int


def choose(candidates: list[Candidate], count: int, rng: random.Random,
           avoid_nodes: frozenset[str] = frozenset()) -> list[Candidate]:
    """Up to ``count`` devices in distinct failure domains, weighted by free space.

    Nodes in ``avoid_nodes`` (a writer just failed on them) are used only if nothing else is.
    """
    preferred = [c for c in candidates if c.node_id not in avoid_nodes and c.free_bytes > 0]
    fallback = [c for c in candidates if c.node_id in avoid_nodes and c.free_bytes > 0]
    chosen: list[Candidate] = []
    domains: set[str] = set()
    for pool in (preferred, fallback):
        pool = list(pool)
        while pool and len(chosen) < count:
            pool = [c for c in pool if c.failure_domain not in domains]
            if not pool:
                break
            total = sum(c.free_bytes for c in pool)
            point = rng.random() * total
            acc = 0
            pick = pool[-1]
            for c in pool:
                acc += c.free_bytes
                if point < acc:
                    pick = c
                    break
            chosen.append(pick)
            domains.add(pick.failure_domain)
    return chosen
