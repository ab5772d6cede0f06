"""appendfs.store.codec — pure data transforms of the store: block checksums (and, later, EC).

No I/O here. The DataNode uses it to checksum appends and verify blocks; the client uses
it to verify every read.
"""

from appendfs.store.codec.blocks import (
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

__all__ = [
    "BLOCK_BYTES",
    "ENTRY_BYTES",
    "BlockError",
    "aligned_range",
    "append_entries",
    "checksum",
    "decode_entry",
    "encode_entry",
    "entries_for",
    "recover_length",
    "verify_blocks",
]
