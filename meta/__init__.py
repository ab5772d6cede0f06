"""appendfs.meta — the POSIX namespace in SQL (PostgreSQL for clusters, SQLite embedded).

Layers inside the package, each module's docstring says more:

* :mod:`~appendfs.meta.schema` — the one schema module (tables, invariants, version);
  ``appendfs format`` calls :func:`create_schema`, every process :func:`check_schema`.
* :mod:`~appendfs.meta.client` — :class:`Meta`, the API the file layer and the S3 gateway
  call (thread-safe; sync, called from trio through ``trio.to_thread.run_sync``).
* :mod:`~appendfs.meta.ops` / :mod:`~appendfs.meta.data` — one function per transaction;
  :mod:`~appendfs.meta.s3` the same for the S3 gateway (buckets, objects, multipart).
* :mod:`~appendfs.meta.txn` — retries, error translation, batched id allocation.
* :mod:`~appendfs.meta.slices` and :mod:`~appendfs.meta.listing` — pure algorithms
  (later-wins slice resolution, S3 key-order listing).
* :mod:`~appendfs.meta.check` — the invariant checker (tests, fsck).

meta never imports appendfs.store: slices name extents by integer ``extent_id`` only.
"""

from appendfs.meta.client import Meta
from appendfs.meta.errors import (
    CommitOutcomeUnknown,
    Corrupt,
    FsError,
    MetaError,
    MetaUnavailable,
    S3Error,
    SessionExpired,
)
from appendfs.meta.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE
from appendfs.meta.schema import ROOT_INO, SCHEMA_VERSION, check_schema, create_schema
from appendfs.meta.slices import NewSlice, Segment, Slice, resolve
from appendfs.meta.txn import MetaConfig
from appendfs.meta.types import (
    Attr,
    DirEntry,
    ListResult,
    Made,
    ObjectEntry,
    PutConditions,
    Replaced,
    S3Bucket,
    S3Key,
    S3Object,
    S3Part,
    S3Tenant,
    S3Upload,
    StatFs,
)

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "SCHEMA_VERSION",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Attr",
    "CommitOutcomeUnknown",
    "Corrupt",
    "DirEntry",
    "FsError",
    "ListResult",
    "Made",
    "Meta",
    "MetaConfig",
    "MetaError",
    "MetaUnavailable",
    "NewSlice",
    "ObjectEntry",
    "PutConditions",
    "Replaced",
    "S3Bucket",
    "S3Error",
    "S3Key",
    "S3Object",
    "S3Part",
    "S3Tenant",
    "S3Upload",
    "Segment",
    "SessionExpired",
    "Slice",
    "StatFs",
    "check_schema",
    "create_schema",
    "resolve",
]
