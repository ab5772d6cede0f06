"""Per-block checksums of extent data (DESIGN §2 Integrity, §8 Checksums).

An extent's bytes are cut into blocks of :data:`BLOCK_BYTES` (4 KiB, so a 4 KiB random
read touches at most two blocks = 8 KiB). Each block has a 16-byte *entry*::

    u64 xxh3_64(block bytes covered) | u32 covered length (1..BLOCK_BYTES) | u32 entry check

The covered length lets the last, partial block of an open extent carry a valid entry;
the entry check (low 32 bits of xxh3_64 of the first 12 bytes) detects a torn or
never-written entry. On a crash the DataNode writes and syncs data *before* entries, so
the recovered length — the longest prefix whose blocks all verify — is never shorter
than what was acknowledged, and bytes without a valid entry are not acknowledged.
"""

from __future__ import annotations

import struct
from typing import Final

import xxhash

BLOCK_BYTES: Final = 4096
ENTRY_BYTES: Final = 16
_ENTRY = struct.Struct(">QII")
_HEAD = struct.Struct(">QI")
_xxh3 = xxhash.xxh3_64_intdigest


class BlockError(Exception):
    """A block's bytes do not match their checksum entry."""

    def __init__(self, block_index: int, reason: str) -> None:
        super().__init__(f"block {block_index}: {reason}")
        self.block_index = block_index


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of ``data``: the checksum carried by every append."""
    return _xxh3(data)


def encode_entry(digest: int, covered: int) -> bytes:
    head = _HEAD.pack(digest, covered)
    return head + struct.pack(">I", _xxh3(head) & 0xFFFFFFFF)


def decode_entry(entry: bytes | memoryview) -> tuple[int, int] | None:
    """(digest, covered length) of a valid entry, or None when torn / never written."""
    digest, covered, check = _ENTRY.unpack(entry)
    if covered == 0 or covered > BLOCK_BYTES or check != _xxh3(bytes(entry[:12])) & 0xFFFFFFFF:
        return None
    return digest, covered


def entries_for(data: bytes | bytearray | memoryview, first_block: int = 0) -> bytes:
    """Entries for ``data`` laid out from the start of block ``first_block``.

    ``data`` starts on a block boundary; its last block may be partial.
    """
    del first_block  # entries do not depend on the position; kept for symmetry at call sites
    view = memoryview(data)
    out = bytearray()
    for start in range(0, len(view), BLOCK_BYTES):
        piece = view[start:start + BLOCK_BYTES]
        out += encode_entry(_xxh3(piece), len(piece))
    return bytes(out)


def aligned_range(offset: int, length: int, extent_length: int) -> tuple[int, int]:
    """The block-aligned [start, end) that covers [offset, offset+length) within the extent."""
    start = offset - offset % BLOCK_BYTES
    end = min(-(-(offset + length) // BLOCK_BYTES) * BLOCK_BYTES, extent_length)
    return start, end


def verify_blocks(data: bytes | bytearray | memoryview, entries: bytes | memoryview, first_block: int) -> None:
    """Check aligned ``data`` against its entries; raise BlockError at the first mismatch."""
    view = memoryview(data)
    ents = memoryview(entries)
    nblocks = -(-len(view) // BLOCK_BYTES)
    if len(ents) < nblocks * ENTRY_BYTES:
        raise BlockError(first_block + len(ents) // ENTRY_BYTES, "checksum entry missing")
    # decode_entry inlined: this loop runs once per 4 KiB of every read (bench/store_bench.py).
    xxh3 = _xxh3
    for i, (digest, covered, check) in enumerate(_ENTRY.iter_unpack(ents[:nblocks * ENTRY_BYTES])):
        at = i * ENTRY_BYTES
        if covered == 0 or covered > BLOCK_BYTES or check != xxh3(ents[at:at + 12]) & 0xFFFFFFFF:
            raise BlockError(first_block + i, "checksum entry missing or torn")
        piece = view[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
        if covered != len(piece):
            raise BlockError(first_block + i, f"entry covers {covered} bytes, block has {len(piece)}")
        if xxh3(piece) != digest:
            raise BlockError(first_block + i, "checksum mismatch")


def recover_length(data: bytes | bytearray | memoryview, entries: bytes | memoryview) -> int:
    """The longest prefix of ``data`` whose blocks all verify (crash recovery).

    A partial block is valid only as the last one. Data past an invalid block is garbage.
    """
    view = memoryview(data)
    ents = memoryview(entries)
    length = 0
    for i in range(len(ents) // ENTRY_BYTES):
        decoded = decode_entry(ents[i * ENTRY_BYTES:(i + 1) * ENTRY_BYTES])
        if decoded is None:
            break
        digest, covered = decoded
        piece = view[i * BLOCK_BYTES:i * BLOCK_BYTES + covered]
        if len(piece) != covered or _xxh3(piece) != digest:
            break
        length = i * BLOCK_BYTES + covered
        if covered < BLOCK_BYTES:
            break
    return length


def append_entries(tail: bytes | bytearray, data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """Entries for appending ``data`` after a partial last block holding ``tail``.

    Returns (entries starting at the tail's block, the new tail). ``len(tail) < BLOCK_BYTES``.
    """
    view = memoryview(data)
    out = bytearray()
    first = BLOCK_BYTES - len(tail)
    if tail:
        head = bytes(tail) + bytes(view[:first])
        out += encode_entry(_xxh3(head), len(head))
        rest = view[first:]
        if len(head) < BLOCK_BYTES:
            return bytes(out), head
    else:
        rest = view
    for start in range(0, len(rest), BLOCK_BYTES):
        piece = rest[start:start + BLOCK_BYTES]
        out += encode_entry(_xxh3(piece), len(piece))
    cut = len(rest) % BLOCK_BYTES
    new_tail = bytes(rest[len(rest) - cut:]) if cut else b""
    return bytes(out), new_tail
