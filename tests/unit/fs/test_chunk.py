"""A file's write buffer (fs.files.Chunk): parts kept without copies, overwrites in place.

Checked against a plain bytearray receiving the same writes: contents, length, and what
is read back through ``copy_into`` and ``overlay``. Large ``bytes`` that extend a chunk
must be kept as the very objects handed in (that is the copy this layout saves).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.fs.files import KEEP_BYTES, Chunk, overlay

PART = 64 << 10  # small parts, so that a few writes cross several of them


def test_large_writes_are_kept_small_ones_gathered() -> None:
    big = bytes(range(256)) * (KEEP_BYTES // 256)
    c = Chunk.of(1000, big, PART)
    assert c.parts[0] is big and c.length == len(big) and c.end == 1000 + len(big)
    c.write(c.length, b"a" * 100, PART)
    c.write(c.length, b"b" * 200, PART)  # joins the bytearray part just made
    assert len(c.parts) == 2 and isinstance(c.parts[1], bytearray) and len(c.parts[1]) == 300
    c.write(c.length, b"c" * PART, PART)  # no room left in it: a new part
    assert len(c.parts) == 3
    assert c.tobytes() == big + b"a" * 100 + b"b" * 200 + b"c" * PART


def test_an_overwrite_copies_only_the_parts_it_touches() -> None:
    first, second = b"x" * KEEP_BYTES, b"y" * KEEP_BYTES
    c = Chunk.of(0, first, PART)
    c.write(c.length, second, PART)
    c.write(KEEP_BYTES + 10, b"ZZ", PART)
    assert c.parts[0] is first  # untouched: still the object handed in
    assert isinstance(c.parts[1], bytearray)
    assert c.tobytes() == first + b"y" * 10 + b"ZZ" + b"y" * (KEEP_BYTES - 12)
    with pytest.raises(ValueError):
        c.write(c.length + 1, b"gap", PART)  # a chunk is contiguous


write = st.tuples(st.integers(0, 1 << 20), st.integers(1, 3 * PART), st.booleans())


@given(st.integers(1, 3 * KEEP_BYTES), st.lists(write, max_size=12), st.integers(0, 1 << 20), st.integers(0, 1 << 20))
@settings(max_examples=60, deadline=None)
def test_any_writes_read_back_as_a_bytearray_would(first: int, writes: list[tuple[int, int, bool]],
                                                   lo: int, span: int) -> None:
    ref = bytearray(bytes([1]) * first)
    c = Chunk.of(0, bytes(ref), PART)
    for i, (at, n, as_view) in enumerate(writes):
        rel = at % (len(ref) + 1)  # inside or at the end, never past it
        data = bytes([(i + 2) % 256]) * n
        c.write(rel, memoryview(data) if as_view else data, PART)
        ref[rel:rel + n] = data
        assert c.length == len(ref)
    assert c.tobytes() == ref
    lo %= len(ref)
    hi = min(len(ref), lo + span)
    buf = bytearray(b"?" * (hi - lo + 7))
    c.copy_into(buf, 3, lo, hi)
    assert buf == b"?" * 3 + ref[lo:hi] + b"?" * 4
    # overlay: the chunk placed at file offset 5000 over a buffer holding [4000, 4000 + len)
    c.file_off = 5000
    under = bytearray(b"." * (len(ref) + 3000))
    overlay(under, 4000, [c])
    assert under == b"." * 1000 + ref + b"." * 2000
