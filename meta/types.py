"""Value types the namespace API returns (immutable, safe to share across threads).

:class:`Attr` and :class:`DirEntry` are NamedTuples, the rest frozen dataclasses: a
readdir of 10,000 entries builds 20,000 of them, and a frozen dataclass costs ~3 µs per
entry to construct against ~0.5 µs for a NamedTuple (docs/benchmarks.md, "Namespace").
Use ``attr._replace(...)`` for a changed copy.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import NamedTuple


class Attr(NamedTuple):
    """The attributes of one inode (an ``inode`` row, columns in this order)."""

    ino: int
    kind: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    parent: int
    gen: int
    slice_seq: int

    @property
    def st_mode(self) -> int:
        return self.kind | self.mode

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


class Made(NamedTuple):
    """What a create (mknod, mkdir, symlink) made: the new inode, and its directory as the
    transaction left it when the transaction did not change it (the directory's mtime was
    within ``dir_mtime_granularity_ns``), else None. The kernel drops its copy of a
    directory's attributes after every create (or unlink, whose answer is the same row)
    in it; this lets a client answer the ``getattr`` that follows without reading the row
    again (fs/filesystem.py ``_left_unchanged``)."""

    attr: Attr
    parent: Attr | None


class Replaced(NamedTuple):
    """What a rename replaced at its target, when it was removed: ``held``, a file that lost
    its last name and is kept held for the caller (``hold_sid``, see ``Meta.unlink_holding``);
    ``removed_dir``, an empty directory the rename removed (its row before, nlink 0)."""

    held: int | None = None
    removed_dir: Attr | None = None


class DirEntry(NamedTuple):
    """One readdir entry; ``attr`` is filled by readdir(plus=True)."""

    name: bytes
    ino: int
    kind: int
    attr: Attr | None = None


@dataclass(frozen=True, slots=True)
class StatFs:
    """Namespace usage. Capacity comes from the store; the file layer combines both."""

    used_inodes: int
    used_bytes: int
    pending_delete_bytes: int


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    """One key of an S3 listing (a regular file under the bucket directory)."""

    key: bytes
    ino: int
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ListResult:
    """One page of :meth:`appendfs.meta.Meta.list_subtree`."""

    objects: list[ObjectEntry]
    common_prefixes: list[bytes]
    is_truncated: bool
    #: Pass as ``start_after`` to get the next page (the last key or prefix returned).
    next_start_after: bytes | None


# --- S3 (see appendfs.meta.s3) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Tenant:
    """Who owns buckets and the POSIX identity their objects are created with."""

    name: str
    uid: int
    gid: int
    file_mode: int
    dir_mode: int


@dataclass(frozen=True, slots=True)
class S3Key:
    """An access key of a tenant (SigV4 credential)."""

    access_key: str
    secret_key: str
    tenant: S3Tenant
    created_ns: int


@dataclass(frozen=True, slots=True)
class S3Bucket:
    """A bucket: the top-level directory ``ino``, owned by ``tenant`` (its name)."""

    name: str
    ino: int
    tenant: str
    created_ns: int


@dataclass(frozen=True, slots=True)
class S3Object:
    """The S3 view of a regular file (or of a directory, for a key ending in ``/``)."""

    key: bytes
    attr: Attr
    #: Hex MD5 (or md5-of-md5s-N), no quotes; None when unknown for ``attr.gen`` (the file
    #: was written through the mount since): compute it and store it with s3_set_etag.
    etag: str | None
    #: Stored content headers (content-type …) and ``x-amz-meta-*``, lower-case names.
    headers: dict[str, str]
    is_dir: bool


@dataclass(frozen=True, slots=True)
class PutConditions:
    """If-Match / If-None-Match of a PUT: ``'*'`` or an ETag (quotes optional)."""

    if_match: str | None = None
    if_none_match: str | None = None


@dataclass(frozen=True, slots=True)
class S3Upload:
    """An in-progress multipart upload."""

    upload_id: str
    bucket: str
    key: bytes
    initiated_ns: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class S3Part:
    """One uploaded part of a multipart upload."""

    part_number: int
    size: int
    etag: str
    created_ns: int
