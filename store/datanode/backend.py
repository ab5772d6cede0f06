"""The storage backend interface of a DataNode device, and what every backend must keep.

A backend stores, per extent: a data region (bytes at offsets), a checksum region (16-byte
block entries, see :mod:`appendfs.store.codec.blocks`) and a small metadata record. It
knows nothing of appends, offsets rules or group commit: :mod:`.extents` does that above
it, identically for every backend. Methods are synchronous and blocking; the DataNode
calls them from worker threads through its per-device I/O queue.

Contract (tests/unit/store/datanode/test_backend_contract.py runs it on every backend):
- ``write_data`` then ``sync_data`` makes those bytes durable; the same for checksums.
- ``set_meta`` is atomic and durable: after a crash either the old or the new record.
- ``truncate`` shortens data and checksum regions durably.
- ``list`` returns every extent whose ``create`` returned, until ``delete`` returns.
- Reads past the written data return the bytes that exist (short read), never garbage.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any

META_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExtentMeta:
    """The durable record of one extent on one device.

    ``state`` is "open" (appendable, length = recovered from checksums) or "sealed"
    (read-only; ``sealed_length`` is exact and final). ``epoch`` is the placement epoch
    this replica was created or copied under; ``index`` its replica / fragment index.
    """

    extent_id: int
    stream_id: int
    epoch: int
    index: int
    state: str = "open"
    sealed_length: int = 0
    version: int = META_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    capacity_bytes: int
    used_bytes: int
    free_bytes: int


class BackendError(Exception):
    """A backend operation failed (I/O error, missing extent)."""


class ExtentMissing(BackendError):
    """The extent, or one of its regions, does not exist on this device."""


class Backend(abc.ABC):
    """Raw per-extent storage on one device."""

    #: A short name for logs and `status` (``file``, ``spdk``).
    kind: str = "?"

    @property
    def local_dir(self) -> str | None:
        """The DataNode directory whose ``extents/`` a client on this host may read sealed
        extents from itself (short-circuit reads, store/client/local.py), or None when the
        backend keeps extents where files cannot be opened by path."""
        return None

    @abc.abstractmethod
    def create(self, meta: ExtentMeta) -> None:
        """Create empty data and checksum regions and the record; durable on return."""

    @abc.abstractmethod
    def write_data(self, extent_id: int, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abc.abstractmethod
    def sync_data(self, extent_ids: list[int]) -> None: ...

    @abc.abstractmethod
    def write_checksums(self, extent_id: int, first_block: int, entries: bytes) -> None: ...

    @abc.abstractmethod
    def sync_checksums(self, extent_ids: list[int]) -> None: ...

    @abc.abstractmethod
    def read_data(self, extent_id: int, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def read_checksums(self, extent_id: int, first_block: int, count: int) -> bytes: ...

    def read_cached(self, extent_id: int, offset: int, length: int, first_block: int,
                    count: int) -> tuple[bytes, bytes] | None:
        """``(read_data(...), read_checksums(...))`` if both can be served without waiting
        for the device (page cache hits), else None. Called on the event loop for small
        reads, so it must never block; the default never tries."""
        return None

    @abc.abstractmethod
    def data_size(self, extent_id: int) -> int:
        """Bytes physically present in the data region (may exceed the valid length)."""

    @abc.abstractmethod
    def truncate(self, extent_id: int, length: int, blocks: int) -> None:
        """Cut data to ``length`` bytes and checksums to ``blocks`` entries, durably."""

    @abc.abstractmethod
    def set_meta(self, meta: ExtentMeta) -> None: ...

    @abc.abstractmethod
    def get_meta(self, extent_id: int) -> ExtentMeta: ...

    @abc.abstractmethod
    def list(self) -> list[int]: ...

    @abc.abstractmethod
    def delete(self, extent_id: int) -> None: ...

    @abc.abstractmethod
    def usage(self) -> Usage: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file descriptors and the like."""
