"""appendfs.fs — the POSIX file layer shared by the mount and the S3 gateway (DESIGN §4).

Public API: :class:`FileSystem` (``async with FileSystem.connect(meta_url) as fs:``),
:class:`FsConfig`, :data:`POLICY_XATTR`. Modules:

* :mod:`~appendfs.fs.filesystem` — namespace calls, open files, reads with readahead,
  sessions and background work;
* :mod:`~appendfs.fs.files` — per-inode write buffers → slices, the resolved segment map,
  the overlay of uncommitted bytes on reads (pure helpers);
* :mod:`~appendfs.fs.streams` — the LogStreams (owner ``fs``; ``s3-part``) a client appends to;
* :mod:`~appendfs.fs.objects` — whole-object writes (data before metadata) and range
  reads for the S3 gateway;
* :mod:`~appendfs.fs.budget` — the write budget (backpressure) and the block cache.

fs imports meta and store.client; it never imports mount or s3.
"""

from appendfs.fs.config import FsConfig
from appendfs.fs.filesystem import POLICY_XATTR, FileSystem, Handle, check_policy
from appendfs.fs.objects import ObjectWriter, RangeReader

__all__ = ["POLICY_XATTR", "FileSystem", "FsConfig", "Handle", "ObjectWriter", "RangeReader", "check_policy"]
