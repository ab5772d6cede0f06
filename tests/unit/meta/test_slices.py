"""Byte-exact tests of later-wins slice resolution against a painted byte-array model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.meta.slices import (
    NewSlice,
    Segment,
    Slice,
    compact,
    live_bytes,
    resolve,
    trim,
    visible,
)


def extent_byte(extent_id: int, off: int) -> int:
    """The byte stored at ``off`` of extent ``extent_id`` (a deterministic fake content)."""
    return (extent_id * 131 + off * 7 + (off >> 8)) % 251 + 1  # never 0, so holes show


def paint(slices: list[Slice], size: int) -> bytes:
    buf = bytearray(size)
    for s in sorted(slices, key=lambda x: x.seq):
        for i in range(s.length):
            if s.file_off + i < size:
                buf[s.file_off + i] = extent_byte(s.extent_id, s.ext_off + i)
    return bytes(buf)


def render(segments: list[Segment]) -> bytes:
    out = bytearray()
    for seg in segments:
        if seg.extent_id is None:
            out += bytes(seg.length)
        else:
            out += bytes(extent_byte(seg.extent_id, seg.ext_off + i) for i in range(seg.length))
    return bytes(out)


slice_lists = st.lists(
    st.tuples(st.integers(0, 300), st.integers(1, 120), st.integers(0, 5), st.integers(0, 1000)),
    max_size=25,
).map(
    lambda xs: [Slice(i + 1, off, n, ext, eo, id=100 + i) for i, (off, n, ext, eo) in enumerate(xs)]
)


@settings(max_examples=400, derandomize=True)
@given(slice_lists, st.integers(0, 450), st.integers(0, 450))
def test_resolve_matches_painting(slices: list[Slice], offset: int, length: int) -> None:
    segs = resolve(slices, offset, length)
    assert sum(s.length for s in segs) == length
    pos = offset
    for seg in segs:  # contiguous, in order, no empty pieces
        assert seg.file_off == pos and seg.length > 0
        pos = seg.end
    assert render(segs) == paint(slices, offset + length)[offset:]


@settings(max_examples=300, derandomize=True)
@given(slice_lists)
def test_compact_reads_the_same_and_never_overlaps(slices: list[Slice]) -> None:
    size = max((s.end for s in slices), default=0)
    new = compact(slices)
    as_slices = [
        Slice(i + 1, n.file_off, n.length, n.extent_id, n.ext_off) for i, n in enumerate(new)
    ]
    assert paint(as_slices, size) == paint(slices, size)
    spans = sorted((n.file_off, n.file_off + n.length) for n in new)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert len(new) <= max(1, 2 * len(slices))


@settings(max_examples=300, derandomize=True)
@given(slice_lists, st.integers(0, 450))
def test_trim_equals_painting_cut(slices: list[Slice], new_size: int) -> None:
    delete, shorten = trim(slices, new_size)
    kept = [
        Slice(s.seq, s.file_off, shorten.get(s.id, s.length), s.extent_id, s.ext_off, s.id)
        for s in slices
        if s.id not in delete
    ]
    assert all(s.end <= new_size for s in kept)
    size = max(new_size, max((s.end for s in slices), default=0))
    assert paint(kept, size) == paint(slices, new_size) + bytes(size - new_size)


@settings(max_examples=300, derandomize=True)
@given(slice_lists)
def test_live_bytes_counts_visible_bytes(slices: list[Slice]) -> None:
    size = max((s.end for s in slices), default=0)
    owner = [None] * size  # which extent shows each byte, by painting
    for s in sorted(slices, key=lambda x: x.seq):
        for i in range(s.file_off, s.end):
            owner[i] = s.extent_id
    want: dict[int, int] = {}
    for ext in owner:
        if ext is not None:
            want[ext] = want.get(ext, 0) + 1
    assert live_bytes(slices) == want


def test_examples() -> None:
    a = Slice(1, 0, 100, 7, 0)
    b = Slice(2, 50, 10, 8, 500)
    assert resolve([b, a], 0, 100) == [
        Segment(0, 50, 7, 0),
        Segment(50, 10, 8, 500),
        Segment(60, 40, 7, 60),
    ]
    assert resolve([a], 90, 20) == [Segment(90, 10, 7, 90), Segment(100, 10, None)]
    # sequential appends in one extent merge into one segment
    assert resolve([Slice(1, 0, 10, 3, 0), Slice(2, 10, 10, 3, 10)], 0, 20) == [
        Segment(0, 20, 3, 0)
    ]
    assert visible([]) == [] and resolve([a], 5, 0) == []
    with pytest.raises(ValueError):
        NewSlice(0, 0, 1, 0)
    with pytest.raises(ValueError):
        resolve([a], -1, 5)
