"""Per-block checksum entries: encoding, torn entries, incremental appends, verify, recovery."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appendfs.store.codec import (
    BLOCK_BYTES,
    ENTRY_BYTES,
    BlockError,
    aligned_range,
    append_entries,
    checksum,
    decode_entry,
    encode_entry,
    entries_for,
    recover_length,
    verify_blocks,
)


def data_of(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def flip_bit(buf: bytes, bit: int) -> bytes:
    out = bytearray(buf)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ---- entries ----------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=BLOCK_BYTES))
@settings(max_examples=100, deadline=None)
def test_entry_round_trip(digest: int, covered: int) -> None:
    entry = encode_entry(digest, covered)
    assert len(entry) == ENTRY_BYTES
    assert decode_entry(entry) == (digest, covered)
    assert decode_entry(memoryview(entry)) == (digest, covered)


def test_never_written_and_out_of_range_entries_decode_to_none() -> None:
    assert decode_entry(bytes(ENTRY_BYTES)) is None
    assert decode_entry(encode_entry(1, 0)) is None
    assert decode_entry(encode_entry(1, BLOCK_BYTES + 1)) is None


@pytest.mark.parametrize("covered", [1, 100, BLOCK_BYTES])
def test_any_flipped_bit_in_an_entry_is_caught(covered: int) -> None:
    block = data_of(covered, seed=covered)
    entry = encode_entry(checksum(block), covered)
    verify_blocks(block, entry, 0)
    for bit in range(ENTRY_BYTES * 8):
        torn = flip_bit(entry, bit)
        decoded = decode_entry(torn)
        if decoded is not None:
            with pytest.raises(BlockError):
                verify_blocks(block, torn, 0)
        assert recover_length(block, torn) == 0
        # A reader (check_entries=False) is failed by any flip in the digest or covered
        # length; a flip in the entry's own check leaves the bytes proven, so it reads them.
        if bit < 96:
            with pytest.raises(BlockError):
                verify_blocks(block, torn, 0, check_entries=False)
        else:
            verify_blocks(block, torn, 0, check_entries=False)


def test_entries_for_covers_each_block() -> None:
    data = data_of(3 * BLOCK_BYTES + 5)
    entries = entries_for(data)
    assert len(entries) == 4 * ENTRY_BYTES
    decoded = [decode_entry(entries[i:i + ENTRY_BYTES]) for i in range(0, len(entries), ENTRY_BYTES)]
    assert [d[1] for d in decoded if d] == [BLOCK_BYTES] * 3 + [5]
    assert decoded[3] == (checksum(data[3 * BLOCK_BYTES:]), 5)
    assert entries_for(b"") == b""


@given(length=st.integers(min_value=0, max_value=5 * BLOCK_BYTES + 9), seed=st.integers(0, 2**16))
@settings(max_examples=100, deadline=None)
def test_entries_for_equals_encoding_each_block_alone(length: int, seed: int) -> None:
    """The bulk encoder (a few C calls for all blocks) against the one-entry reference."""
    data = data_of(length, seed)
    reference = b"".join(encode_entry(checksum(data[i:i + BLOCK_BYTES]), len(data[i:i + BLOCK_BYTES]))
                         for i in range(0, length, BLOCK_BYTES))
    assert entries_for(data) == reference


# ---- incremental appends ----------------------------------------------------------------


@given(tail_len=st.integers(min_value=0, max_value=BLOCK_BYTES - 1),
       data_len=st.one_of(st.just(0), st.integers(min_value=0, max_value=3 * BLOCK_BYTES + 7)),
       seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_append_entries_equals_entries_of_the_concatenation(tail_len: int, data_len: int, seed: int) -> None:
    # The extent so far is some full blocks plus `tail`; the new entries must rewrite the
    # tail's block and add the rest exactly as if computed over the whole extent at once.
    full_blocks = seed % 3
    before = data_of(full_blocks * BLOCK_BYTES + tail_len, seed)
    tail = before[full_blocks * BLOCK_BYTES:]
    data = data_of(data_len, seed + 1)
    entries, new_tail = append_entries(tail, data)
    whole = before + data
    expected = entries_for(whole)[full_blocks * ENTRY_BYTES:]
    assert entries == expected
    assert new_tail == whole[len(whole) - len(whole) % BLOCK_BYTES:]
    assert len(new_tail) < BLOCK_BYTES


def test_append_entries_many_small_appends() -> None:
    whole = b""
    tail = b""
    entries_by_block: dict[int, bytes] = {}
    rng = random.Random(7)
    for _ in range(200):
        data = rng.randbytes(rng.choice([0, 1, 17, 1000, BLOCK_BYTES, BLOCK_BYTES + 3]))
        first = len(whole) // BLOCK_BYTES
        entries, tail = append_entries(tail, data)
        for i in range(0, len(entries), ENTRY_BYTES):
            entries_by_block[first + i // ENTRY_BYTES] = entries[i:i + ENTRY_BYTES]
        whole += data
    stored = b"".join(entries_by_block[i] for i in sorted(entries_by_block))
    assert stored == entries_for(whole)
    verify_blocks(whole, stored, 0)


# ---- verification -----------------------------------------------------------------------


def test_verify_accepts_good_data_at_any_first_block() -> None:
    data = data_of(2 * BLOCK_BYTES + 100)
    verify_blocks(data, entries_for(data), 0)
    verify_blocks(data, entries_for(data), 57)
    verify_blocks(b"", b"", 3)


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_verify_catches_one_flipped_byte_anywhere(data: st.DataObject) -> None:
    length = data.draw(st.integers(min_value=1, max_value=3 * BLOCK_BYTES + 11))
    buf = data_of(length, length)
    entries = entries_for(buf)
    pos = data.draw(st.integers(0, length - 1))
    xor = data.draw(st.integers(1, 255))
    bad = bytearray(buf)
    bad[pos] ^= xor
    with pytest.raises(BlockError) as err:
        verify_blocks(bad, entries, 10)
    assert err.value.block_index == 10 + pos // BLOCK_BYTES


@given(block=st.integers(0, 3), bit=st.integers(96, 127))
@settings(max_examples=40, deadline=None)
def test_verify_names_the_block_whose_entry_check_is_torn(block: int, bit: int) -> None:
    """Data and digest intact, only an entry's own check damaged: the checksum file is
    corrupt there, and verification says so at that block (scrub relies on it)."""
    data = data_of(4 * BLOCK_BYTES - 7)
    entries = bytearray(entries_for(data))
    entries[block * ENTRY_BYTES:(block + 1) * ENTRY_BYTES] = flip_bit(
        bytes(entries[block * ENTRY_BYTES:(block + 1) * ENTRY_BYTES]), bit)
    with pytest.raises(BlockError, match="torn") as err:
        verify_blocks(data, bytes(entries), 5)
    assert err.value.block_index == 5 + block


@pytest.mark.parametrize("check_entries", [True, False])
def test_verify_catches_missing_and_mismatched_entries(check_entries: bool) -> None:
    data = data_of(2 * BLOCK_BYTES)
    entries = entries_for(data)
    with pytest.raises(BlockError, match="missing"):
        verify_blocks(data, entries[:ENTRY_BYTES], 0, check_entries=check_entries)
    with pytest.raises(BlockError, match="missing or torn") as err:  # never written: all zeros
        verify_blocks(data, entries[:ENTRY_BYTES] + bytes(ENTRY_BYTES), 0, check_entries=check_entries)
    assert err.value.block_index == 1
    # An entry for a longer block does not vouch for a short one (a truncated read).
    with pytest.raises(BlockError, match="covers"):
        verify_blocks(data[:BLOCK_BYTES + 10], entries, 0, check_entries=check_entries)


@given(data=st.binary(min_size=1, max_size=6 * BLOCK_BYTES), at=st.integers(0), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_a_reader_names_the_block_whose_bytes_changed(data: bytes, at: int, bit: int) -> None:
    """check_entries=False (readers): a flipped data bit fails at its block, as it does
    with every entry checked."""
    entries = entries_for(data)
    at %= len(data)
    bad = bytearray(data)
    bad[at] ^= 1 << bit
    for check_entries in (True, False):
        verify_blocks(data, entries, 3, check_entries=check_entries)
        with pytest.raises(BlockError, match="mismatch") as err:
            verify_blocks(bytes(bad), entries, 3, check_entries=check_entries)
        assert err.value.block_index == 3 + at // BLOCK_BYTES


# ---- recovery ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, BLOCK_BYTES - 1, BLOCK_BYTES, 3 * BLOCK_BYTES + 123, 4 * BLOCK_BYTES])
def test_recover_length_of_intact_data(length: int) -> None:
    data = data_of(length)
    assert recover_length(data, entries_for(data)) == length


def test_recover_length_data_without_entries_is_not_recovered() -> None:
    # Data written past the last entry (a crash before the entries) is garbage.
    data = data_of(3 * BLOCK_BYTES + 500)
    acked = data[:BLOCK_BYTES + 300]
    assert recover_length(data, entries_for(acked)) == BLOCK_BYTES + 300
    assert recover_length(data[:BLOCK_BYTES + 100], entries_for(acked)) == BLOCK_BYTES


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_recover_length_stops_at_the_first_bad_block(data: st.DataObject) -> None:
    nblocks = data.draw(st.integers(1, 5))
    last = data.draw(st.integers(1, BLOCK_BYTES))
    length = (nblocks - 1) * BLOCK_BYTES + last
    buf = data_of(length, length)
    entries = entries_for(buf)
    bad_block = data.draw(st.integers(0, nblocks - 1))
    how = data.draw(st.sampled_from(["data", "entry", "zero-entry"]))
    if how == "data":
        pos = bad_block * BLOCK_BYTES
        broken = bytearray(buf)
        broken[pos] ^= 0xFF
        buf = bytes(broken)
    else:
        e = bytearray(entries)
        at = bad_block * ENTRY_BYTES
        e[at:at + ENTRY_BYTES] = bytes(ENTRY_BYTES) if how == "zero-entry" else flip_bit(
            entries[at:at + ENTRY_BYTES], data.draw(st.integers(0, 127)))
        entries = bytes(e)
    # Everything from the bad block on is excluded, however good the later blocks are.
    assert recover_length(buf, entries) == bad_block * BLOCK_BYTES


def test_recover_length_partial_block_is_only_valid_last() -> None:
    a = data_of(100, 1)
    b = data_of(BLOCK_BYTES, 2)
    # A short entry for block 0 followed by a valid entry for block 1: block 1 is not reached.
    entries = encode_entry(checksum(a), len(a)) + encode_entry(checksum(b), len(b))
    buf = a + bytes(BLOCK_BYTES - len(a)) + b
    assert recover_length(buf, entries) == 100


# ---- aligned ranges ---------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length", "extent_length", "expected"), [
    (0, 0, 0, (0, 0)),
    (0, 1, 10, (0, 10)),
    (0, BLOCK_BYTES, 10 * BLOCK_BYTES, (0, BLOCK_BYTES)),
    (1, BLOCK_BYTES, 10 * BLOCK_BYTES, (0, 2 * BLOCK_BYTES)),
    (BLOCK_BYTES - 1, 2, 10 * BLOCK_BYTES, (0, 2 * BLOCK_BYTES)),
    (5 * BLOCK_BYTES + 7, 10, 5 * BLOCK_BYTES + 100, (5 * BLOCK_BYTES, 5 * BLOCK_BYTES + 100)),
    (2 * BLOCK_BYTES, BLOCK_BYTES, 4 * BLOCK_BYTES, (2 * BLOCK_BYTES, 3 * BLOCK_BYTES)),
])
def test_aligned_range(offset: int, length: int, extent_length: int, expected: tuple[int, int]) -> None:
    assert aligned_range(offset, length, extent_length) == expected


@given(st.integers(0, 10**7), st.integers(0, 10**6), st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_aligned_range_covers_the_request_and_reads_little(offset: int, length: int, slack: int) -> None:
    extent_length = offset + length + slack
    start, end = aligned_range(offset, length, extent_length)
    assert start % BLOCK_BYTES == 0
    assert end % BLOCK_BYTES == 0 or end == extent_length
    assert start <= offset and offset + length <= end <= extent_length
    assert offset - start < BLOCK_BYTES and end - (offset + length) < BLOCK_BYTES
    # DESIGN §8: a 4 KiB random read touches at most 16 KiB.
    if length == 4096:
        assert end - start <= 16 * 1024
