"""Locators of `store put` / `store get`: text round trip and refusal of anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.store.client.locator import Locator, Piece
from appendfs.store.errors import BadLocator

pieces_st = st.lists(st.builds(Piece, st.integers(0, 2**63), st.integers(0, 2**40), st.integers(0, 2**30)),
                     max_size=6)


@given(st.integers(0, 2**63), st.integers(0, 2**64 - 1), pieces_st)
@settings(max_examples=200, deadline=None)
def test_round_trip(stream_id: int, xxh3: int, pieces: list[Piece]) -> None:
    loc = Locator(stream_id, xxh3, sum(p.length for p in pieces), tuple(pieces))
    text = str(loc)
    assert "\n" not in text and " " not in text
    assert Locator.parse(text) == loc
    assert Locator.parse(f"  {text}\n") == loc
    assert str(Locator.parse(text)) == text


def test_known_text() -> None:
    loc = Locator.parse("afs1:42:00000000deadbeef:30:7@0+10,8@4096+20")
    assert loc == Locator(42, 0xDEADBEEF, 30, (Piece(7, 0, 10), Piece(8, 4096, 20)))
    assert Locator.parse("afs1:1:0000000000000000:0:") == Locator(1, 0, 0, ())


@pytest.mark.parametrize("text", [
    "",
    "afs1",
    "afs2:1:0000000000000000:0:",
    "AFS1:1:0000000000000000:0:",
    "afs1:x:0000000000000000:0:",
    "afs1:1:000000000000000:0:",  # 15 hex digits
    "afs1:1:00000000000000000:0:",  # 17
    "afs1:1:000000000000000G:0:",
    "afs1:1:00000000DEADBEEF:0:",  # checksums are lower case
    "afs1:1:0000000000000000:-1:",
    "afs1:1:0000000000000000:10:1@0",
    "afs1:1:0000000000000000:10:1@0+",
    "afs1:1:0000000000000000:10:1@+10",
    "afs1:1:0000000000000000:10:1+10@0",
    "afs1:1:0000000000000000:10:1@0+10,",
    "afs1:1:0000000000000000:10:,1@0+10",
    "afs1:1:0000000000000000:10:1@0+10;",
    "afs1:1:0000000000000000:10:1@0+-10",
    "afs1:1:0000000000000000:0",
    "afs1:1:0000000000000000:10:1@0+10\nafs1:1:0000000000000000:0:",
    "afs1:\u0661:0000000000000000:0:",  # a non-ASCII digit is not a digit of a locator
    "afs1:1:0000000000000000:10:1@0+\uff110",
])
def test_malformed_refused(text: str) -> None:
    with pytest.raises(BadLocator):
        Locator.parse(text)


@pytest.mark.parametrize("text", [
    "afs1:1:0000000000000000:11:1@0+10",
    "afs1:1:0000000000000000:9:1@0+10",
    "afs1:1:0000000000000000:10:",
    "afs1:1:0000000000000000:0:1@0+1",
    "afs1:1:0000000000000000:30:1@0+10,2@0+10",
])
def test_pieces_must_add_up_to_size(text: str) -> None:
    with pytest.raises(BadLocator, match="add up"):
        Locator.parse(text)


@given(st.text(max_size=60))
@settings(max_examples=200, deadline=None)
def test_arbitrary_text_parses_only_to_a_consistent_locator(text: str) -> None:
    try:
        loc = Locator.parse(text)
    except BadLocator:
        return
    assert sum(p.length for p in loc.pieces) == loc.size
    assert Locator.parse(str(loc)) == loc
