"""The namespace schema: every table of ``appendfs.meta`` (SQLAlchemy Core), versioned.

This is the only module that defines namespace tables. ``appendfs format`` calls
:func:`create_schema`; every daemon that opens the namespace calls :func:`check_schema`
first and refuses a database of another version. The cluster schema of ``store/metanode``
lives in the same database under its own names (``cluster``, ``stream``, ``extent`` …),
so no name here may collide with those.

Conventions (they hold for every table):

* Times are integers in nanoseconds since the Unix epoch (``*_ns``), sizes and offsets
  are bytes. Names, symlink targets and xattrs are raw bytes (``bytea`` / BLOB), so
  ordering is bytewise on both engines — the S3 listing depends on that.
* ``kind`` is the ``S_IFMT`` part of ``st_mode`` (``stat.S_IFREG`` …); ``mode`` holds only
  the permission bits (``0o7777``).
* Inode numbers are never reused (64-bit, allocated in batches from ``counter``).
* Extent ids are u64 (DESIGN §8); they are stored in signed 64-bit columns through
  :class:`U64`, which maps the upper half of the range onto negative numbers.

Invariants (checked by :func:`appendfs.meta.check.check_invariants`):

1. Inode 1 is the root directory; every inode with ``nlink > 0`` is reachable from it.
2. A non-directory's ``nlink`` equals the number of dentries naming it; a directory's
   ``nlink`` is 2 + its number of subdirectories, it has exactly one dentry (except the
   root, which has none) and ``inode.parent`` is the directory holding that dentry.
3. An inode with ``nlink == 0`` exists only while some session holds it open
   (a ``sustained`` row); the last close moves it to ``delfile``.
4. Every slice belongs to an existing inode or to an inode in ``delfile``, and ends at or
   before its inode's ``size``.
5. S3 rows name live inodes: an ``s3_object`` row's inode exists (regular file or
   directory) and its ``gen`` is at most the inode's; an ``s3_bucket`` row's inode is a
   directory.

History: version 2 added ``s3_tenant`` and ``s3_object``; credentials and buckets name a
tenant instead of carrying uid/gid and an owner key.
"""

from __future__ import annotations

import stat
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from appendfs.errors import NotFormatted, VersionMismatch
from appendfs.meta.errors import MetaUnavailable

#: Bump on every incompatible change; ``check_schema`` refuses any other version.
SCHEMA_VERSION = 2

ROOT_INO = 1
#: Counter names in ``counter`` (batched allocation, see appendfs.meta.txn.IdAllocator).
NEXT_INO = "next_ino"
NEXT_SID = "next_sid"
#: Not an allocator: the row cross-directory directory renames lock (FOR UPDATE) so their
#: cycle checks see a stable tree (the VFS's s_vfs_rename_mutex, in SQL).
RENAME_LOCK = "rename_lock"

_U64_SPAN = 1 << 64
_I64_MAX = (1 << 63) - 1


class U64(sa.types.TypeDecorator[int]):
    """An unsigned 64-bit integer stored in a signed BIGINT (two's complement)."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> int | None:
        if value is None:
            return None
        if not 0 <= value < _U64_SPAN:
            raise ValueError(f"{value} is not a u64")
        return value - _U64_SPAN if value > _I64_MAX else value

    def process_result_value(self, value: int | None, dialect: Any) -> int | None:
        if value is None:
            return None
        return value + _U64_SPAN if value < 0 else value


def u64_to_db(value: int) -> int:
    """What :class:`U64` stores for ``value`` (for statements that bind values themselves,
    :mod:`appendfs.meta.fastsql`)."""
    stored = U64().process_bind_param(value, None)
    assert stored is not None
    return stored


def _id() -> sa.types.TypeEngine[int]:
    # SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (autoincrementing).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


metadata = sa.MetaData()

meta_schema = sa.Table(
    "meta_schema",
    metadata,
    sa.Column(
        "id",
        sa.Integer,
        primary_key=True,
        autoincrement=False,
        comment="Always 1: the table has exactly one row.",
    ),
    sa.Column(
        "version",
        sa.Integer,
        nullable=False,
        comment="SCHEMA_VERSION of the code that formatted the namespace.",
    ),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="When `appendfs format` ran."),
    sa.CheckConstraint("id = 1", name="meta_schema_one_row"),
    comment="Version of the namespace schema; checked by every process before use.",
)

counter = sa.Table(
    "counter",
    metadata,
    sa.Column(
        "name",
        sa.String(64),
        primary_key=True,
        comment="next_ino, next_sid (id spaces) or rename_lock (a lock row).",
    ),
    sa.Column(
        "value",
        sa.BigInteger,
        nullable=False,
        comment="First id not yet handed out. Clients take batches (value += batch) in a "
        "short transaction of their own, so creates never contend on this row.",
    ),
    comment="Id allocators. Ids are never reused; a crashed client leaves harmless gaps.",
)

inode = sa.Table(
    "inode",
    metadata,
    sa.Column(
        "ino",
        sa.BigInteger,
        primary_key=True,
        autoincrement=False,
        comment="Inode number, never reused. 1 is the root directory.",
    ),
    sa.Column(
        "kind",
        sa.Integer,
        nullable=False,
        comment="S_IFMT bits of st_mode (S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFBLK, "
        "S_IFIFO, S_IFSOCK). Never changes.",
    ),
    sa.Column("mode", sa.Integer, nullable=False, comment="Permission bits only (& 0o7777)."),
    sa.Column("uid", sa.BigInteger, nullable=False, comment="Owner user id."),
    sa.Column("gid", sa.BigInteger, nullable=False, comment="Owner group id."),
    sa.Column(
        "nlink",
        sa.BigInteger,
        nullable=False,
        comment="Non-directory: number of dentries naming it (0 = unlinked but held "
        "open by a sustained row). Directory: 2 + number of subdirectories.",
    ),
    sa.Column(
        "size",
        sa.BigInteger,
        nullable=False,
        comment="File size in bytes; every slice ends at or before it. Symlink: length "
        "of the target. Directories: 0.",
    ),
    sa.Column("atime_ns", sa.BigInteger, nullable=False, comment="Last access (ns)."),
    sa.Column(
        "mtime_ns",
        sa.BigInteger,
        nullable=False,
        comment="Last content change (ns). A directory's mtime may lag concurrent "
        "creates by at most MetaConfig.dir_mtime_granularity_ns.",
    ),
    sa.Column("ctime_ns", sa.BigInteger, nullable=False, comment="Last status change (ns)."),
    sa.Column(
        "rdev", sa.BigInteger, nullable=False, comment="Device number of S_IFCHR/S_IFBLK, else 0."
    ),
    sa.Column(
        "parent",
        sa.BigInteger,
        nullable=False,
        comment="Directories: the directory holding its one dentry (root: 1). Used for "
        "cycle checks in rename and '..'. Other kinds: 0 (they may have many).",
    ),
    sa.Column(
        "gen",
        sa.BigInteger,
        nullable=False,
        comment="Change counter: +1 on every update of the row. Conditional updates match "
        "(ino, gen) and check the rowcount; clients compare it for close-to-open.",
    ),
    sa.Column(
        "slice_seq",
        sa.BigInteger,
        nullable=False,
        comment="Highest slice.seq handed out for this inode; later seq wins on overlap.",
    ),
    comment="One row per inode (file, directory, symlink, device, fifo, socket).",
)

dentry = sa.Table(
    "dentry",
    metadata,
    sa.Column(
        "parent",
        sa.BigInteger,
        sa.ForeignKey("inode.ino"),
        primary_key=True,
        comment="Directory containing the entry.",
    ),
    sa.Column(
        "name",
        sa.LargeBinary,
        primary_key=True,
        comment="Entry name: 1..255 bytes, no '/' or NUL, not '.' or '..'. Bytewise "
        "order of (parent, name) is the readdir cursor and the S3 key order.",
    ),
    sa.Column(
        "ino",
        sa.BigInteger,
        sa.ForeignKey("inode.ino"),
        nullable=False,
        comment="Inode named by the entry.",
    ),
    sa.Column(
        "kind",
        sa.Integer,
        nullable=False,
        comment="Copy of inode.kind (never changes), so readdir and listing need no join.",
    ),
    sa.CheckConstraint("length(name) BETWEEN 1 AND 255", name="dentry_name_length"),
    sa.Index("dentry_ino", "ino"),
    comment="Directory entries. PK (parent, name) serves lookup, readdir and S3 listing.",
)

slice_ = sa.Table(
    "slice",
    metadata,
    sa.Column(
        "id",
        _id(),
        primary_key=True,
        autoincrement=True,
        comment="Surrogate id, so the GC can repoint one slice with one conditional update.",
    ),
    sa.Column(
        "ino",
        sa.BigInteger,
        nullable=False,
        comment="File inode. No foreign key: after the last unlink the inode row is "
        "gone and its slices wait for purging under a delfile row.",
    ),
    sa.Column(
        "seq",
        sa.BigInteger,
        nullable=False,
        comment="Commit order within the file (from inode.slice_seq): later seq wins "
        "where slices overlap.",
    ),
    sa.Column("file_off", sa.BigInteger, nullable=False, comment="File offset of the first byte."),
    sa.Column(
        "length",
        sa.BigInteger,
        nullable=False,
        comment="Bytes covered (> 0); truncate shortens it, never lengthens.",
    ),
    sa.Column(
        "extent_id",
        U64,
        nullable=False,
        comment="Logical extent holding the bytes (DESIGN §8); placement is the store's.",
    ),
    sa.Column(
        "ext_off",
        sa.BigInteger,
        nullable=False,
        comment="Offset of the first byte within the extent. The bytes were durable on "
        "every replica before this row was committed.",
    ),
    sa.CheckConstraint("length > 0 AND file_off >= 0 AND ext_off >= 0", name="slice_ranges"),
    sa.UniqueConstraint("ino", "seq", name="slice_ino_seq"),
    sa.Index("slice_extent", "extent_id"),
    comment="File data maps: (ino, file_off, length) -> (extent_id, ext_off).",
)

symlink = sa.Table(
    "symlink",
    metadata,
    sa.Column(
        "ino",
        sa.BigInteger,
        sa.ForeignKey("inode.ino"),
        primary_key=True,
        comment="The S_IFLNK inode.",
    ),
    sa.Column("target", sa.LargeBinary, nullable=False, comment="Target path, 1..4095 bytes."),
    comment="Symlink targets; exactly one row per S_IFLNK inode.",
)

xattr = sa.Table(
    "xattr",
    metadata,
    sa.Column(
        "ino", sa.BigInteger, sa.ForeignKey("inode.ino"), primary_key=True, comment="Owner inode."
    ),
    sa.Column("name", sa.LargeBinary, primary_key=True, comment="Attribute name, 1..255 bytes."),
    sa.Column("value", sa.LargeBinary, nullable=False, comment="Value, at most 64 KiB."),
    comment="Extended attributes (also: user.appendfs.redundancy, DESIGN §4).",
)

session = sa.Table(
    "session",
    metadata,
    sa.Column(
        "sid",
        sa.BigInteger,
        primary_key=True,
        autoincrement=False,
        comment="Session id (from counter next_sid); one per client process (mount, S3).",
    ),
    sa.Column("owner", sa.String(255), nullable=False, comment="host:pid and role, for humans."),
    sa.Column("started_ns", sa.BigInteger, nullable=False, comment="When the session began."),
    sa.Column(
        "expires_ns",
        sa.BigInteger,
        nullable=False,
        comment="Heartbeat deadline. Past it, any live client may clean the session up.",
    ),
    sa.Index("session_expires", "expires_ns"),
    comment="Live clients. Their open files keep unlinked inodes alive.",
)

sustained = sa.Table(
    "sustained",
    metadata,
    sa.Column(
        "sid",
        sa.BigInteger,
        sa.ForeignKey("session.sid"),
        primary_key=True,
        comment="Session holding the inode open.",
    ),
    sa.Column(
        "ino",
        sa.BigInteger,
        sa.ForeignKey("inode.ino"),
        primary_key=True,
        comment="Inode held open. While any row names it, nlink 0 does not delete it.",
    ),
    sa.Index("sustained_ino", "ino"),
    comment="Open files per session (one row per session and inode, however many handles).",
)

delfile = sa.Table(
    "delfile",
    metadata,
    sa.Column(
        "ino",
        sa.BigInteger,
        primary_key=True,
        autoincrement=False,
        comment="A deleted file whose inode row is gone; its slices still exist.",
    ),
    sa.Column("size", sa.BigInteger, nullable=False, comment="Size at deletion (accounting)."),
    sa.Column("queued_ns", sa.BigInteger, nullable=False, comment="When it was queued."),
    comment="Delete queue: slices of these inodes are purged in batches, then the row.",
)

flock = sa.Table(
    "flock",
    metadata,
    sa.Column(
        "ino", sa.BigInteger, sa.ForeignKey("inode.ino"), primary_key=True, comment="Locked inode."
    ),
    sa.Column(
        "sid",
        sa.BigInteger,
        sa.ForeignKey("session.sid"),
        primary_key=True,
        comment="Holder's session.",
    ),
    sa.Column("owner", sa.BigInteger, primary_key=True, comment="Lock owner within the session."),
    sa.Column("ltype", sa.String(1), nullable=False, comment="'R' shared or 'W' exclusive."),
    comment="BSD flock() locks (cluster-wide locks are a later capability, DESIGN §8).",
)

plock = sa.Table(
    "plock",
    metadata,
    sa.Column(
        "ino", sa.BigInteger, sa.ForeignKey("inode.ino"), primary_key=True, comment="Locked inode."
    ),
    sa.Column(
        "sid",
        sa.BigInteger,
        sa.ForeignKey("session.sid"),
        primary_key=True,
        comment="Holder's session.",
    ),
    sa.Column("owner", sa.BigInteger, primary_key=True, comment="Lock owner within the session."),
    sa.Column(
        "records",
        sa.LargeBinary,
        nullable=False,
        comment="Packed (type, start, end) byte-range records of this owner.",
    ),
    comment="POSIX fcntl() byte-range locks (not exposed through the mount yet).",
)

s3_tenant = sa.Table(
    "s3_tenant",
    metadata,
    sa.Column(
        "name",
        sa.String(64),
        primary_key=True,
        comment="Tenant name: owns buckets (s3_bucket.tenant) and access keys.",
    ),
    sa.Column("uid", sa.BigInteger, nullable=False, comment="POSIX uid of what it creates."),
    sa.Column("gid", sa.BigInteger, nullable=False, comment="POSIX gid of what it creates."),
    sa.Column(
        "file_mode", sa.Integer, nullable=False, comment="Permission bits of new objects (& 0o7777)."
    ),
    sa.Column(
        "dir_mode",
        sa.Integer,
        nullable=False,
        comment="Permission bits of new buckets and of the directories keys create (& 0o7777).",
    ),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="Creation time."),
    comment="S3 tenants: the POSIX identity S3 requests act as. Changing one changes only "
    "what is created afterwards.",
)

s3_credential = sa.Table(
    "s3_credential",
    metadata,
    sa.Column("access_key", sa.String(128), primary_key=True, comment="Access key id."),
    sa.Column("secret_key", sa.String(128), nullable=False, comment="Secret for SigV4."),
    sa.Column(
        "tenant",
        sa.String(64),
        sa.ForeignKey("s3_tenant.name"),
        nullable=False,
        comment="The tenant the key acts as.",
    ),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="Creation time."),
    sa.Index("s3_credential_tenant", "tenant"),
    comment="S3 access keys; any number per tenant.",
)

s3_bucket = sa.Table(
    "s3_bucket",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True, comment="Bucket name (S3 naming rules)."),
    sa.Column(
        "ino",
        sa.BigInteger,
        sa.ForeignKey("inode.ino"),
        nullable=False,
        unique=True,
        comment="The directory that is the bucket, created under the root with the same "
        "name. Destroying the directory (rmdir, also through the mount) deletes this row "
        "and the bucket's uploads in the same transaction.",
    ),
    sa.Column(
        "tenant",
        sa.String(64),
        sa.ForeignKey("s3_tenant.name"),
        nullable=False,
        comment="Owning tenant; only it sees and changes the bucket.",
    ),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="Creation time."),
    sa.Index("s3_bucket_tenant", "tenant", "name"),
    comment="S3 buckets: a bucket is a top-level directory (DESIGN §5).",
)

s3_object = sa.Table(
    "s3_object",
    metadata,
    sa.Column(
        "ino",
        sa.BigInteger,
        sa.ForeignKey("inode.ino"),
        primary_key=True,
        comment="A regular file (an object) or a directory PUT as a key ending in '/' (a "
        "directory with a row is not removed when its last key goes). Deleted with the "
        "inode (ops.destroy_inode).",
    ),
    sa.Column(
        "gen",
        sa.BigInteger,
        nullable=False,
        comment="inode.gen the etag was computed for; <= inode.gen. The etag is valid only "
        "while inode.gen == gen: any update of the inode (a write through the mount) "
        "makes it unknown until the gateway stores it again.",
    ),
    sa.Column(
        "etag",
        sa.String(64),
        nullable=True,
        comment="Hex MD5 of the content (md5-of-md5s-N for multipart), no quotes; NULL "
        "when not known.",
    ),
    sa.Column(
        "headers",
        sa.Text,
        nullable=False,
        comment="JSON object of stored content headers (content-type …) and x-amz-meta-*; "
        "valid whatever gen is.",
    ),
    comment="The S3 view of files: ETag and stored headers (absent row: unknown, none).",
)

s3_upload = sa.Table(
    "s3_upload",
    metadata,
    sa.Column(
        "upload_id",
        sa.String(64),
        primary_key=True,
        comment="Random 32 hex digits; never reused.",
    ),
    sa.Column(
        "bucket",
        sa.String(63),
        sa.ForeignKey("s3_bucket.name"),
        nullable=False,
        comment="Target bucket.",
    ),
    sa.Column(
        "key",
        sa.LargeBinary,
        nullable=False,
        comment="Target object key (bytes), valid (appendfs.meta.s3.split_key), not a "
        "directory key.",
    ),
    sa.Column("initiated_ns", sa.BigInteger, nullable=False, comment="Initiation time."),
    sa.Column(
        "headers", sa.Text, nullable=False, comment="JSON of the object's stored headers."
    ),
    sa.Index("s3_upload_key", "bucket", "key", "initiated_ns", "upload_id"),
    sa.Index("s3_upload_initiated", "initiated_ns"),
    comment="In-progress multipart uploads; deleted (with parts) on completion, abort, "
    "expiry and bucket removal.",
)

s3_part = sa.Table(
    "s3_part",
    metadata,
    sa.Column(
        "upload_id",
        sa.String(64),
        sa.ForeignKey("s3_upload.upload_id"),
        primary_key=True,
        comment="Upload the part belongs to.",
    ),
    sa.Column("part_number", sa.Integer, primary_key=True, comment="1..10000."),
    sa.Column(
        "size",
        sa.BigInteger,
        nullable=False,
        comment="Part size in bytes; its slices lie within [0, size).",
    ),
    sa.Column("etag", sa.String(64), nullable=False, comment="MD5 of the part (hex, no quotes)."),
    sa.Column("created_ns", sa.BigInteger, nullable=False, comment="Upload time."),
    comment="Uploaded parts; their data maps are in s3_part_slice.",
)

s3_part_slice = sa.Table(
    "s3_part_slice",
    metadata,
    sa.Column("upload_id", sa.String(64), primary_key=True, comment="Upload."),
    sa.Column("part_number", sa.Integer, primary_key=True, comment="Part."),
    sa.Column("part_off", sa.BigInteger, primary_key=True, comment="Offset within the part."),
    sa.Column(
        "length",
        sa.BigInteger,
        nullable=False,
        comment="Bytes (> 0); slices of one part never overlap and end at or before its size.",
    ),
    sa.Column(
        "extent_id",
        U64,
        nullable=False,
        comment="Logical extent (in an s3-part stream). Completion copies these rows into "
        "`slice`, so a completed object's slices point into s3-part extents too.",
    ),
    sa.Column("ext_off", sa.BigInteger, nullable=False, comment="Offset in the extent."),
    sa.ForeignKeyConstraint(
        ["upload_id", "part_number"], ["s3_part.upload_id", "s3_part.part_number"]
    ),
    sa.Index("s3_part_slice_extent", "extent_id"),
    comment="Data maps of parts; completion concatenates them into the object's slices.",
)

#: Kinds an inode may have.
KINDS = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)


def _read_version(conn: sa.Connection) -> int | None:
    if not sa.inspect(conn).has_table("meta_schema"):
        return None
    row = conn.execute(sa.select(meta_schema.c.version)).first()
    return None if row is None else int(row.version)


def create_schema(engine: Engine) -> None:
    """Create the namespace tables, record SCHEMA_VERSION and the root directory.

    Idempotent: on a database already formatted with this version it changes nothing;
    on another version it raises :class:`VersionMismatch` before touching anything.
    """
    with engine.begin() as conn:
        found = _read_version(conn)
        if found is not None and found != SCHEMA_VERSION:
            raise VersionMismatch("namespace schema", SCHEMA_VERSION, found)
        metadata.create_all(conn, checkfirst=True)
        if found is not None:
            return
        now = time.time_ns()
        conn.execute(meta_schema.insert().values(id=1, version=SCHEMA_VERSION, created_ns=now))
        conn.execute(
            counter.insert(),
            [
                {"name": NEXT_INO, "value": ROOT_INO + 1},
                {"name": NEXT_SID, "value": 1},
                {"name": RENAME_LOCK, "value": 0},
            ],
        )
        conn.execute(
            inode.insert().values(
                ino=ROOT_INO,
                kind=stat.S_IFDIR,
                mode=0o755,
                uid=0,
                gid=0,
                nlink=2,
                size=0,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
                rdev=0,
                parent=ROOT_INO,
                gen=0,
                slice_seq=0,
            )
        )


def check_schema(engine: Engine) -> None:
    """Raise NotFormatted / VersionMismatch unless the namespace has this code's version
    (MetaUnavailable, one clear line, when the database cannot be opened at all)."""
    url = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            found = _read_version(conn)
            conn.rollback()
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise MetaUnavailable(f"cannot open the namespace database {url}: {reason} "
                              "(check META_URL and that the database is running)") from exc
    if found is None:
        raise NotFormatted(
            f"{url} has no appendfs namespace schema: run `appendfs format {url}` first"
        )
    if found != SCHEMA_VERSION:
        raise VersionMismatch(f"namespace schema in {url}", SCHEMA_VERSION, found)
