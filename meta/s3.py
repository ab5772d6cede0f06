"""S3 transactions of the namespace: tenants, access keys, buckets, objects, multipart uploads.

Same contract as :mod:`appendfs.meta.ops`: each public function taking a connection is the
body of ONE transaction run by :class:`appendfs.meta.txn.Runner`; it raises
:class:`~appendfs.meta.errors.S3Error` for S3 conditions (the runner rolls back, so a failed
call changes nothing) and :class:`~appendfs.meta.txn.Retry` when a race was lost. The
functions without a connection are pure (key splitting, conditions, ETags) and unit-tested.

Mapping (DESIGN §5): a bucket is a directory under the root (``s3_bucket`` names it and its
tenant); key ``a/b/c`` is the path ``a/b/c`` under it; a key ending in ``/`` is a directory
(no data; its ETag is the MD5 of nothing). An object is a regular file; its S3 view — the
ETag and the stored headers — is its ``s3_object`` row, and the ETag counts only while
``inode.gen`` equals the row's ``gen`` (a write through the mount bumps gen, so the
gateway recomputes the MD5 and stores it with :func:`set_etag`).

Data flow of a PUT (and of CompleteMultipartUpload, which shares it): the gateway appends
the body to the store first; then :func:`put_object` walks the key's directories in one
transaction, creating the missing ones, checks the conditions, inserts a NEW inode with
the slices and points the dentry at it. Readers see the old inode or the new one, never a
mix; the old file loses that link exactly as with rename-over (destroyed, or kept while a
session holds it open). Multipart completion concatenates the parts' slice rows at
cumulative offsets: no byte is copied.

Locking, on top of ops' rules: the bucket and the directory receiving the entry are held
``FOR KEY SHARE`` (they cannot be removed under us, creates in them do not conflict); an
entry being replaced or removed is locked as in unlink / rmdir; an upload row is locked
``FOR KEY SHARE`` by a part upload and ``FOR UPDATE`` by completion, abort and expiry; a
bucket row ``FOR KEY SHARE`` by an upload's creation and ``FOR UPDATE`` when it goes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import itertools
import json
import re
import stat
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from appendfs.meta import data, ops, schema
from appendfs.meta.errors import FsError, S3Error
from appendfs.meta.fastsql import Stmt
from appendfs.meta.slices import NewSlice
from appendfs.meta.txn import Retry
from appendfs.meta.types import (
    Attr,
    PutConditions,
    S3Bucket,
    S3Key,
    S3Object,
    S3Part,
    S3Tenant,
    S3Upload,
)

I, D = schema.inode, schema.dentry  # noqa: E741
T, K, B, OBJ = schema.s3_tenant, schema.s3_credential, schema.s3_bucket, schema.s3_object
U, P, PS = schema.s3_upload, schema.s3_part, schema.s3_part_slice

KEY_MAX = 1024
MAX_PART_NUMBER = 10_000
#: Bound of the stored headers as JSON (the gateway enforces S3's 2 KiB of user metadata).
HEADERS_MAX = 16_384
EMPTY_MD5 = hashlib.md5(b"").hexdigest()

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ACCESS_KEY = re.compile(r"[A-Za-z0-9._-]{3,128}")
_MD5 = re.compile(r"[0-9a-f]{32}")
_ALNUM_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ALNUM = _ALNUM_UPPER + "abcdefghijklmnopqrstuvwxyz"


# --- pure helpers -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPath:
    """A valid key as path components: ``dirs``, then ``leaf`` (None for a directory key)."""

    dirs: tuple[bytes, ...]
    leaf: bytes | None

    @property
    def is_dir(self) -> bool:
        return self.leaf is None


def split_key(key: bytes) -> KeyPath:
    """Split an object key into path components, or raise S3Error ``InvalidKey``.

    Valid: 1..1024 bytes, no NUL, no leading ``/``, components of 1..255 bytes that are not
    ``.`` or ``..`` (so ``//`` is refused); a trailing ``/`` makes it a directory key.
    """
    if not key:
        raise S3Error("InvalidKey", "the key is empty")
    if len(key) > KEY_MAX:
        raise S3Error("InvalidKey", f"the key is {len(key)} bytes (max {KEY_MAX})")
    if b"\0" in key:
        raise S3Error("InvalidKey", "the key contains a NUL byte")
    if key.startswith(b"/"):
        raise S3Error("InvalidKey", "the key starts with '/'")
    is_dir = key.endswith(b"/")
    parts = (key[:-1] if is_dir else key).split(b"/")
    for p in parts:
        if not p:
            raise S3Error("InvalidKey", "the key has an empty component ('//')")
        if p in (b".", b".."):
            raise S3Error("InvalidKey", "the key has a '.' or '..' component")
        if len(p) > ops.NAME_MAX:
            raise S3Error("InvalidKey", f"a key component is {len(p)} bytes (max {ops.NAME_MAX})")
    if is_dir:
        return KeyPath(tuple(parts), None)
    return KeyPath(tuple(parts[:-1]), parts[-1])


def check_bucket_name(name: str) -> bytes:
    """S3's rules for new bucket names; returns the directory name (InvalidBucketName)."""
    ok = (
        _BUCKET.fullmatch(name) is not None
        and ".." not in name
        and not name.startswith(("xn--", "sthree-"))
        and not name.endswith(("-s3alias", "--ol-s3"))
    )
    try:
        ipaddress.IPv4Address(name)
        ok = False
    except ValueError:
        pass
    if not ok:
        raise S3Error(
            "InvalidBucketName",
            f"{name[:80]!r}: 3-63 lowercase letters, digits, '.' and '-', starting and ending "
            "with a letter or digit, not an IP address",
        )
    return name.encode()


def strip_etag(value: str) -> str:
    """An ETag as stored: no surrounding whitespace, ``W/`` or quotes; lower-case."""
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    return v.strip('"').lower()


def etag_listed(header: str, etag: str) -> bool:
    """True if ``etag`` is in the comma-separated ETag list of an If-(None-)Match header."""
    want = strip_etag(etag)
    return any(strip_etag(v) == want for v in header.split(","))


def check_conditions(cond: PutConditions | None, exists: bool, etag: str | None, ino: int) -> None:
    """Evaluate If-Match / If-None-Match of a write against the current object (RFC 7232 order).

    ``exists``: an object is at the key; ``etag``: its ETag, None when unknown (then
    ``EtagUnknown`` carrying ``ino`` when a condition needs it). If-Match with no object is
    ``NoSuchKey`` (what S3 answers); a failed condition is ``PreconditionFailed``.
    """
    if cond is None:
        return
    if cond.if_match is not None:
        if not exists:
            raise S3Error("NoSuchKey", "If-Match: no object has this key")
        if cond.if_match.strip() != "*":
            if etag is None:
                raise S3Error("EtagUnknown", "the ETag of the current object is unknown", ino=ino)
            if not etag_listed(cond.if_match, etag):
                raise S3Error("PreconditionFailed", "If-Match: the object's ETag differs")
    if cond.if_none_match is not None and exists:
        if cond.if_none_match.strip() == "*":
            raise S3Error("PreconditionFailed", "If-None-Match: an object has this key")
        if etag is None:
            raise S3Error("EtagUnknown", "the ETag of the current object is unknown", ino=ino)
        if etag_listed(cond.if_none_match, etag):
            raise S3Error("PreconditionFailed", "If-None-Match: the object's ETag matches")


def multipart_etag(part_etags: Sequence[str]) -> str:
    """S3's ETag of a multipart object: hex MD5 of the parts' binary MD5s, ``-`` part count."""
    md5s = b"".join(bytes.fromhex(strip_etag(e)) for e in part_etags)
    return f"{hashlib.md5(md5s).hexdigest()}-{len(part_etags)}"


def check_slices(slices: Sequence[NewSlice], size: int) -> None:
    """Slices of an object or part must end at or before its size (ValueError: caller's bug)."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    for s in slices:
        if s.file_off + s.length > size:
            raise ValueError(f"slice {s} ends past the size {size}")


def check_pieces(pieces: Sequence[NewSlice], size: int) -> None:
    """A part's pieces: within the part, not overlapping (ValueError: caller's bug)."""
    check_slices(pieces, size)
    ordered = sorted(pieces, key=lambda s: s.file_off)
    for a, b in itertools.pairwise(ordered):
        if a.file_off + a.length > b.file_off:
            raise ValueError(f"part pieces {a} and {b} overlap")


def check_md5(etag: str) -> str:
    """A part's ETag (hex MD5, quotes allowed) as stored (ValueError otherwise)."""
    e = strip_etag(etag)
    if not _MD5.fullmatch(e):
        raise ValueError(f"{etag!r} is not a hex MD5")
    return e


def concat_parts(parts: Sequence[tuple[int, Sequence[NewSlice]]]) -> tuple[list[NewSlice], int]:
    """Concatenate parts ``(size, pieces at part offsets)``: object slices and total size."""
    out: list[NewSlice] = []
    base = 0
    for size, pieces in parts:
        out.extend(NewSlice(base + s.file_off, s.length, s.extent_id, s.ext_off) for s in pieces)
        base += size
    return out, base


def clean_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers as stored: names lower-cased, values str; MetadataTooLarge past HEADERS_MAX."""
    clean = {str(k).lower(): str(v) for k, v in headers.items()}
    headers_json(clean)
    return clean


def headers_json(headers: dict[str, str]) -> str:
    """Stored headers (as :func:`clean_headers` returns them) as JSON text."""
    text = json.dumps(headers, sort_keys=True, separators=(",", ":"))
    if len(text) > HEADERS_MAX:
        raise S3Error("MetadataTooLarge", f"stored headers of {len(text)} bytes")
    return text


def _headers(text: str | None) -> dict[str, str]:
    return dict(json.loads(text)) if text else {}


def check_tenant(t: S3Tenant) -> None:
    if not _TENANT.fullmatch(t.name):
        raise S3Error("InvalidArgument", f"tenant name {t.name[:80]!r}: 1-64 of [A-Za-z0-9._-]")
    if t.uid < 0 or t.gid < 0 or not 0 <= t.file_mode <= 0o7777 or not 0 <= t.dir_mode <= 0o7777:
        raise S3Error("InvalidArgument", f"bad uid/gid/modes for tenant {t.name!r}")


def new_access_key(rand: Any) -> str:
    """20 upper-case letters and digits, like AWS's (``rand`` is the ``secrets`` module)."""
    return "".join(rand.choice(_ALNUM_UPPER) for _ in range(20))


def new_secret_key(rand: Any) -> str:
    """40 letters and digits (about 238 bits)."""
    return "".join(rand.choice(_ALNUM) for _ in range(40))


def check_credentials(access_key: str, secret_key: str) -> None:
    if not _ACCESS_KEY.fullmatch(access_key):
        raise S3Error("InvalidArgument", "access key: 3-128 of [A-Za-z0-9._-]")
    if not 8 <= len(secret_key) <= 128 or not secret_key.isprintable() or " " in secret_key:
        raise S3Error("InvalidArgument", "secret key: 8-128 printable characters, no spaces")


# --- small SQL helpers ------------------------------------------------------------------------


def _upsert(
    conn: sa.Connection,
    table: sa.Table,
    values: dict[str, Any],
    update: Sequence[str],
    where: Any = None,
) -> None:
    """INSERT, or on a primary-key conflict UPDATE the ``update`` columns (if ``where``)."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table).values(**values)
    keys = list(table.primary_key.columns)
    set_ = {c: stmt.excluded[c] for c in update}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=set_, where=where))


def _prefix_bound(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string starting with ``prefix`` (None: none)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


# --- tenants and access keys ------------------------------------------------------------------


def _tenant(r: Any) -> S3Tenant:
    return S3Tenant(r.name, r.uid, r.gid, r.file_mode, r.dir_mode)


def tenant_set(conn: sa.Connection, t: S3Tenant, now: int) -> S3Tenant:
    """Create or update a tenant (its created_ns is kept)."""
    values = dataclasses.asdict(t) | {"created_ns": now}
    _upsert(conn, T, values, ("uid", "gid", "file_mode", "dir_mode"))
    return t


def tenant_get(conn: sa.Connection, name: str) -> S3Tenant | None:
    row = conn.execute(sa.select(T).where(T.c.name == name)).first()
    return None if row is None else _tenant(row)


def tenants(conn: sa.Connection) -> list[S3Tenant]:
    return [_tenant(r) for r in conn.execute(sa.select(T).order_by(T.c.name))]


def _keys_query() -> sa.Select[Any]:
    return sa.select(
        K.c.access_key,
        K.c.secret_key,
        K.c.created_ns,
        T.c.name,
        T.c.uid,
        T.c.gid,
        T.c.file_mode,
        T.c.dir_mode,
    ).select_from(K.join(T, T.c.name == K.c.tenant))


def _key(r: Any) -> S3Key:
    return S3Key(r.access_key, r.secret_key, _tenant(r), r.created_ns)


def key_create(conn: sa.Connection, tenant: str, access: str, secret: str, now: int) -> S3Key:
    """Add an access key of an existing tenant; InvalidArgument if either is wrong."""
    t = tenant_get(conn, tenant)
    if t is None:
        raise S3Error("InvalidArgument", f"no S3 tenant {tenant!r} (create it first)")
    row = {"access_key": access, "secret_key": secret, "tenant": tenant, "created_ns": now}
    if not ops.insert_ignore(conn, K, row):
        raise S3Error("InvalidArgument", f"access key {access!r} exists")
    return S3Key(access, secret, t, now)


def key_get(conn: sa.Connection, access: str) -> S3Key | None:
    row = conn.execute(_keys_query().where(K.c.access_key == access)).first()
    return None if row is None else _key(row)


def keys(conn: sa.Connection, tenant: str | None) -> list[S3Key]:
    q = _keys_query().order_by(K.c.access_key)
    if tenant is not None:
        q = q.where(K.c.tenant == tenant)
    return [_key(r) for r in conn.execute(q)]


def key_delete(conn: sa.Connection, access: str) -> bool:
    return bool(conn.execute(sa.delete(K).where(K.c.access_key == access)).rowcount)


# --- directories for keys ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Owner:
    """POSIX identity of what a PUT creates, and the xattrs new inodes copy from their parent."""

    uid: int
    gid: int
    file_mode: int
    dir_mode: int
    inherit: tuple[bytes, ...] = ()


class IdPool:
    """Inode numbers taken before a transaction that needs at most that many.

    :meth:`restart` at the start of every attempt (a retried transaction reuses them);
    :meth:`unused` after the commit are the ones to give back to the allocator.
    """

    def __init__(self, ids: Sequence[int]) -> None:
        self._ids = list(ids)
        self._used = 0

    def restart(self) -> None:
        self._used = 0

    def take(self) -> int:
        ino = self._ids[self._used]
        self._used += 1
        return ino

    def unused(self) -> list[int]:
        return self._ids[self._used :]


def _bucket_dir(conn: sa.Connection, bucket_ino: int) -> Attr:
    """The bucket directory, held FOR KEY SHARE (NoSuchBucket when it is gone)."""
    a = ops.get_attr(conn, bucket_ino, lock="key_share")
    if a is None or not a.is_dir:
        raise S3Error("NoSuchBucket", f"bucket directory {bucket_ino} does not exist")
    return a


_XATTR_ONE = Stmt(lambda _d: sa.select(schema.xattr.c.name, schema.xattr.c.value).where(
    schema.xattr.c.ino == sa.bindparam("src"), schema.xattr.c.name == sa.bindparam("name")))


def _inherit(conn: sa.Connection, src: int, dst: int, names: Sequence[bytes]) -> None:
    """Copy the xattrs ``names`` that ``src`` has onto the new inode ``dst``."""
    if not names:
        return
    X = schema.xattr
    if len(names) == 1:  # the gateway's case (the redundancy policy): a prebuilt statement
        rows = _XATTR_ONE.rows(conn, src=src, name=names[0])
    else:
        rows = [tuple(r) for r in conn.execute(sa.select(X.c.name, X.c.value).where(X.c.ino == src,
                                                                                      X.c.name.in_(names)))]
    values = [{"ino": dst, "name": name, "value": value} for name, value in rows]
    if values:
        conn.execute(X.insert(), values)


def _mkdir(
    conn: sa.Connection, parent: int, name: bytes, owner: Owner, ino: int, now: int, gran: int
) -> Attr:
    """A new directory in ``parent`` (a lost race with another creator or rmdir: Retry)."""
    new = ops.NewInode(ino, stat.S_IFDIR, owner.dir_mode, owner.uid, owner.gid)
    try:
        a = ops.make(conn, parent, name, new, now, gran).attr
    except FsError as e:
        raise Retry(f"directory {name!r} in {parent} changed: {e}") from e
    _inherit(conn, parent, a.ino, owner.inherit)
    return a


def ensure_dirs(
    conn: sa.Connection,
    bucket_ino: int,
    dirs: Sequence[bytes],
    owner: Owner,
    ids: IdPool,
    now: int,
    gran: int,
) -> tuple[Attr, bool]:
    """Walk ``dirs`` from the bucket, creating missing ones: (deepest directory, created?).

    The deepest directory is held FOR KEY SHARE (or was created here). A component that is
    not a directory is a KeyConflict.
    """
    bucket = _bucket_dir(conn, bucket_ino)
    ino, made = bucket.ino, None
    for name in dirs:
        found = ops.get_dentry(conn, ino, name)
        if found is None:
            made = _mkdir(conn, ino, name, owner, ids.take(), now, gran)
            ino = made.ino
        elif found[1] != stat.S_IFDIR:
            raise S3Error("KeyConflict", f"{name[:64]!r} is a file, not a directory")
        else:
            ino, made = found[0], None
    if made is not None:
        return made, True
    if not dirs:
        return bucket, False
    deepest = ops.get_attr(conn, ino, lock="key_share")
    if deepest is None:
        raise Retry(f"directory {ino} vanished during the walk")
    return deepest, False


# --- objects ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Body:
    """The content a PUT commits: slices already durable in the store, and its S3 view."""

    slices: tuple[NewSlice, ...]
    size: int
    etag: str | None
    headers: dict[str, str]  # as clean_headers returns them
    mtime_ns: int | None = None


@dataclasses.dataclass(frozen=True)
class Put:
    """One PUT (or completion): where, what, as whom, under which conditions."""

    bucket_ino: int
    key: bytes
    path: KeyPath
    body: Body
    owner: Owner
    cond: PutConditions | None


_ATTR_COLS = [I.c[f] for f in Attr._fields]
_VIEW_COLS = [*_ATTR_COLS, OBJ.c.gen.label("o_gen"), OBJ.c.etag, OBJ.c.headers]


def _view(key: bytes, r: Any) -> S3Object:
    """An S3Object from an inode row outer-joined with its s3_object row."""
    a = Attr(*r[: len(Attr._fields)])
    if a.is_dir:
        etag: str | None = EMPTY_MD5
    else:
        etag = r.etag if r.o_gen == a.gen else None
    return S3Object(key, a, etag, _headers(r.headers), a.is_dir)


def _view_query(by_name: bool = False) -> sa.Select[Any]:
    """Inode columns and its s3_object row; ``by_name`` adds the dentry (parent, name)."""
    joined = I.outerjoin(OBJ, OBJ.c.ino == I.c.ino)
    if by_name:
        joined = D.join(joined, I.c.ino == D.c.ino)
    return sa.select(*_VIEW_COLS).select_from(joined)


# Built once (the 4 KiB GET path): SQLAlchemy then only binds values and finds its cached
# compilation, instead of building the join and the WHERE clause on every call.
_BY_NAME = _view_query(by_name=True).where(D.c.parent == sa.bindparam("parent"), D.c.name == sa.bindparam("name"))


def object_by_ino(conn: sa.Connection, ino: int) -> S3Object | None:
    """The S3 view of a file or directory by inode (``key`` is b""; None if gone)."""
    row = conn.execute(_view_query().where(I.c.ino == ino)).first()
    if row is None or row.kind not in (stat.S_IFREG, stat.S_IFDIR):
        return None
    return _view(b"", row)


def etags(conn: sa.Connection, inos: Sequence[int]) -> dict[int, str]:
    """The known ETags (valid for the current gen) among ``inos``."""
    out: dict[int, str] = {}
    for i in range(0, len(inos), 500):
        q = (
            sa.select(OBJ.c.ino, OBJ.c.etag)
            .select_from(OBJ.join(I, I.c.ino == OBJ.c.ino))
            .where(
                OBJ.c.ino.in_(list(inos[i : i + 500])),
                OBJ.c.gen == I.c.gen,
                OBJ.c.etag.is_not(None),
            )
        )
        out.update({r.ino: r.etag for r in conn.execute(q)})
    return out


def set_etag(conn: sa.Connection, ino: int, gen: int, etag: str) -> bool:
    """Store the computed ETag of file ``ino`` if its gen is still ``gen`` (headers kept)."""
    a = ops.get_attr(conn, ino, lock="key_share")  # it cannot be destroyed under the upsert
    if a is None or a.gen != gen or a.kind != stat.S_IFREG:
        return False
    values = {"ino": ino, "gen": gen, "etag": strip_etag(etag), "headers": "{}"}
    _upsert(conn, OBJ, values, ("gen", "etag"), where=OBJ.c.gen <= gen)
    return True


def get_object(conn: sa.Connection, bucket_ino: int, key: bytes) -> S3Object:
    """The object at ``key``: a regular file, or a directory for a key ending in '/'.

    NoSuchKey when nothing is there, when the kinds disagree (a directory named without the
    trailing '/', a file with it) or the key is not valid; NoSuchBucket without the bucket.
    """
    try:
        path = split_key(key)
    except S3Error:
        raise S3Error("NoSuchKey", "no object has this key (it is not a valid key)") from None
    names = path.dirs if path.leaf is None else (*path.dirs, path.leaf)
    cur = bucket_ino
    for name in names[:-1]:
        found = ops.get_dentry(conn, cur, name)
        if found is None or found[1] != stat.S_IFDIR:
            raise _no_such_key(conn, bucket_ino)
        cur = found[0]
    row = conn.execute(_BY_NAME, {"parent": cur, "name": names[-1]}).first()
    want = stat.S_IFDIR if path.is_dir else stat.S_IFREG
    if row is None or row.kind != want:
        raise _no_such_key(conn, bucket_ino)
    return _view(key, row)


def _no_such_key(conn: sa.Connection, bucket_ino: int) -> S3Error:
    if ops.get_attr(conn, bucket_ino) is None:
        return S3Error("NoSuchBucket", f"bucket directory {bucket_ino} does not exist")
    return S3Error("NoSuchKey", "no object has this key")


def put_object(conn: sa.Connection, put: Put, ids: IdPool, now: int, gran: int) -> S3Object:
    """Create or replace the object at ``put.key`` (see the module docstring)."""
    ids.restart()
    parent, created = ensure_dirs(conn, put.bucket_ino, put.path.dirs, put.owner, ids, now, gran)
    if put.path.leaf is None:
        return _put_dir(conn, put, parent, created)
    return _put_file(conn, put, parent, put.path.leaf, ids.take(), now, gran)


def _put_dir(conn: sa.Connection, put: Put, d: Attr, created: bool) -> S3Object:
    """A directory key: the directory exists now; its headers are stored (a marker row)."""
    check_conditions(put.cond, not created, EMPTY_MD5, d.ino)
    values = {"ino": d.ino, "gen": d.gen, "etag": None, "headers": headers_json(put.body.headers)}
    _upsert(conn, OBJ, values, ("gen", "etag", "headers"))
    return S3Object(put.key, d, EMPTY_MD5, dict(put.body.headers), True)


_INSERT_OBJ = Stmt(lambda _d: OBJ.insert())  # ino, gen, etag, headers (ints and text)


def _new_file(conn: sa.Connection, put: Put, parent: int, ino: int, now: int) -> Attr:
    """Insert the new file inode with its slices, inherited xattrs and s3_object row."""
    b, o = put.body, put.owner
    mtime = now if b.mtime_ns is None else b.mtime_ns
    a = Attr(
        ino,
        stat.S_IFREG,
        o.file_mode & 0o7777,
        o.uid,
        o.gid,
        1,
        b.size,
        now,
        mtime,
        now,
        0,
        0,
        0,
        len(b.slices),
    )
    ops.insert_inode(conn, a)
    data.insert_slices(conn, a._replace(slice_seq=0), b.slices)  # seqs 1..n: later ones win
    _inherit(conn, parent, ino, o.inherit)
    etag = None if b.etag is None else strip_etag(b.etag)
    _INSERT_OBJ.rowcount(conn, ino=ino, gen=a.gen, etag=etag, headers=headers_json(b.headers))
    return a


def _current(conn: sa.Connection, a: Attr | None) -> tuple[bool, str | None]:
    """(an object exists, its ETag if known) for the existing entry ``a`` of a key."""
    if a is None or a.kind != stat.S_IFREG:
        return False, None
    row = conn.execute(sa.select(OBJ.c.gen, OBJ.c.etag).where(OBJ.c.ino == a.ino)).first()
    return True, (row.etag if row is not None and row.gen == a.gen else None)


def _put_file(
    conn: sa.Connection, put: Put, parent: Attr, name: bytes, ino: int, now: int, gran: int
) -> S3Object:
    found = ops.get_dentry(conn, parent.ino, name)
    if found is not None and found[1] == stat.S_IFDIR:
        raise S3Error("KeyConflict", f"{name[:64]!r} is a directory (its key ends in '/')")
    if found is None:
        check_conditions(put.cond, False, None, 0)
        a = _new_file(conn, put, parent.ino, ino, now)
        if not ops.insert_dentry(conn, parent.ino, name, ino, stat.S_IFREG):
            raise Retry(f"{name!r} was created in {parent.ino} meanwhile")
        if gran == 0 or parent.mtime_ns < now - gran:
            ops.touch_dir(conn, parent.ino, now, gran)
    else:
        old, p = _lock_entry(conn, parent.ino, name, found[0], now, gran)
        exists, etag = _current(conn, old)
        check_conditions(put.cond, exists, etag, old.ino)
        a = _new_file(conn, put, parent.ino, ino, now)
        ops.point_dentry(conn, parent.ino, name, old.ino, a)
        ops.drop_link(conn, old, now)
        if p is not None:
            ops.update_inode(conn, p, mtime_ns=now, ctime_ns=now)
    etag_out = None if put.body.etag is None else strip_etag(put.body.etag)
    return S3Object(put.key, a, etag_out, dict(put.body.headers), False)


def _lock_entry(
    conn: sa.Connection, parent: int, name: bytes, ino: int, now: int, gran: int
) -> tuple[Attr, Attr | None]:
    """Lock a non-directory entry being replaced or removed (as unlink does).

    Returns it and, when the parent's mtime is due for an update, the locked parent.
    """
    p = ops.get_attr(conn, parent)
    touch = p is not None and (gran == 0 or p.mtime_ns < now - gran)
    locked = ops.lock_inodes(conn, (ino, parent) if touch else (ino,), delete=(ino,))
    a = locked.get(ino)
    if a is None or ops.get_dentry(conn, parent, name) != (ino, a.kind):
        raise Retry(f"entry {name!r} in {parent} changed before we locked it")
    return a, locked.get(parent) if touch else None


def _remove_dir(conn: sa.Connection, parent: int, name: bytes, ino: int, now: int) -> bool:
    """rmdir of an empty directory (locks as rmdir does); False if it is not empty."""
    locked = ops.lock_inodes(conn, (ino, parent), delete=(ino,))
    if (
        ino not in locked
        or parent not in locked
        or ops.get_dentry(conn, parent, name) != (ino, stat.S_IFDIR)
    ):
        raise Retry(f"directory {name!r} in {parent} changed before we locked it")
    if not ops.dir_is_empty(conn, ino):
        return False
    _destroy_dir(conn, locked[parent], name, locked[ino], now)
    return True


def _destroy_dir(conn: sa.Connection, p: Attr, name: bytes, d: Attr, now: int) -> None:
    ops.delete_dentry(conn, p.ino, name, d.ino)
    ops.destroy_inode(conn, d, now)
    ops.update_inode(conn, p, nlink=p.nlink - 1, mtime_ns=now, ctime_ns=now)


def _try_lock(conn: sa.Connection, ino: int, delete: bool) -> Attr | None:
    """Lock an inode row unless someone holds a conflicting lock (SKIP LOCKED): None then."""
    q = sa.select(*_ATTR_COLS).where(I.c.ino == ino)
    row = conn.execute(q.with_for_update(key_share=not delete, skip_locked=True)).first()
    return None if row is None else Attr(*row)


def _is_marked(conn: sa.Connection, ino: int) -> bool:
    return conn.execute(sa.select(OBJ.c.ino).where(OBJ.c.ino == ino)).first() is not None


def _prune(conn: sa.Connection, parent: int, name: bytes, ino: int, now: int) -> bool:
    """Best effort: remove a directory a deletion left empty; False to stop going up.

    Kept: a directory that is not empty, that was PUT as a key of its own (s3_object row),
    or that another transaction is using (holds a lock on it or its parent). Not waiting
    for those locks is what keeps this free of deadlocks: the caller already holds the
    deleted file's row, which a PUT holding the directory may be waiting for.
    """
    if not ops.dir_is_empty(conn, ino) or _is_marked(conn, ino):
        return False
    locked: dict[int, Attr] = {}
    for i in sorted((parent, ino)):
        a = _try_lock(conn, i, delete=i == ino)
        if a is None:
            return False
        locked[i] = a
    if (
        ops.get_dentry(conn, parent, name) != (ino, stat.S_IFDIR)
        or not ops.dir_is_empty(conn, ino)
        or _is_marked(conn, ino)
    ):
        return False
    _destroy_dir(conn, locked[parent], name, locked[ino], now)
    return True


def delete_object(conn: sa.Connection, bucket_ino: int, key: bytes, now: int, gran: int) -> bool:
    """Remove the object at ``key``; False if there is none (or the key is not valid).

    A directory key removes the directory if empty (KeyConflict otherwise). Then the
    directories of the key that became empty are removed, deepest first, up to the bucket
    — except a directory that was PUT as a key of its own (it has an s3_object row) or is
    in use by another transaction at that moment (see :func:`_prune`).
    """
    try:
        path = split_key(key)
    except S3Error:
        return False
    chain: list[tuple[int, bytes, int]] = []
    cur = bucket_ino
    for name in path.dirs:
        found = ops.get_dentry(conn, cur, name)
        if found is None or found[1] != stat.S_IFDIR:
            return False
        chain.append((cur, name, found[0]))
        cur = found[0]
    if path.leaf is None:
        if not _remove_dir(conn, *chain.pop(), now):
            raise S3Error("KeyConflict", "the directory is not empty")
    else:
        found = ops.get_dentry(conn, cur, path.leaf)
        if found is None or found[1] != stat.S_IFREG:
            return False
        a, p = _lock_entry(conn, cur, path.leaf, found[0], now, gran)
        ops.delete_dentry(conn, cur, path.leaf, a.ino)
        ops.drop_link(conn, a, now)
        if p is not None:
            ops.update_inode(conn, p, mtime_ns=now, ctime_ns=now)
    for parent, name, ino in reversed(chain):
        if not _prune(conn, parent, name, ino, now):
            break
    return True


# --- buckets ------------------------------------------------------------------------------------


def _bucket(r: Any) -> S3Bucket:
    return S3Bucket(r.name, r.ino, r.tenant, r.created_ns)


def bucket_create(
    conn: sa.Connection,
    name: str,
    tenant: str,
    inherit: tuple[bytes, ...],
    ino: int,
    now: int,
    gran: int,
) -> S3Bucket:
    """mkdir /name with the tenant's identity and register it as the tenant's bucket."""
    t = tenant_get(conn, tenant)
    if t is None:
        raise S3Error("InvalidArgument", f"no S3 tenant {tenant!r}")
    row = conn.execute(sa.select(B.c.tenant).where(B.c.name == name)).first()
    if row is not None:
        code = "BucketAlreadyOwnedByYou" if row.tenant == tenant else "BucketAlreadyExists"
        raise S3Error(code, f"the bucket {name!r} exists")
    dname = name.encode()
    if ops.get_dentry(conn, schema.ROOT_INO, dname) is not None:
        raise S3Error("BucketAlreadyExists", f"/{name} exists (not a bucket)")
    owner = Owner(t.uid, t.gid, t.file_mode, t.dir_mode, inherit)
    a = _mkdir(conn, schema.ROOT_INO, dname, owner, ino, now, gran)
    conn.execute(B.insert().values(name=name, ino=a.ino, tenant=tenant, created_ns=now))
    return S3Bucket(name, a.ino, tenant, now)


def bucket_get(conn: sa.Connection, name: str) -> S3Bucket | None:
    row = conn.execute(sa.select(B).where(B.c.name == name)).first()
    return None if row is None else _bucket(row)


def buckets(conn: sa.Connection, tenant: str) -> list[S3Bucket]:
    q = sa.select(B).where(B.c.tenant == tenant).order_by(B.c.name)
    return [_bucket(r) for r in conn.execute(q)]


def bucket_delete(conn: sa.Connection, name: str, tenant: str, now: int) -> None:
    """Remove an empty bucket of ``tenant``: its directory, row and uploads."""
    row = conn.execute(sa.select(B.c.ino, B.c.tenant).where(B.c.name == name)).first()
    if row is None or row.tenant != tenant:
        raise S3Error("NoSuchBucket", f"no bucket {name!r} of this tenant")
    dent = conn.execute(sa.select(D.c.parent, D.c.name).where(D.c.ino == row.ino)).first()
    if dent is None:
        raise Retry(f"bucket {name!r}: its directory changed")
    if not _remove_dir(conn, dent.parent, bytes(dent.name), row.ino, now):
        raise S3Error("BucketNotEmpty", f"the bucket {name!r} is not empty")


# --- multipart uploads ------------------------------------------------------------------------


def _upload(r: Any) -> S3Upload:
    return S3Upload(r.upload_id, r.bucket, bytes(r.key), r.initiated_ns, _headers(r.headers))


def _get_upload(conn: sa.Connection, upload_id: str, lock: str | None = None) -> S3Upload:
    """The upload (NoSuchUpload), optionally locked: "key_share" or "update"."""
    q = sa.select(U).where(U.c.upload_id == upload_id)
    if lock == "key_share":
        q = q.with_for_update(read=True, key_share=True)
    elif lock == "update":
        q = q.with_for_update()
    row = conn.execute(q).first()
    if row is None:
        raise S3Error("NoSuchUpload", f"no multipart upload {upload_id[:64]!r}")
    return _upload(row)


def upload_create(
    conn: sa.Connection, upload_id: str, bucket: str, key: bytes, headers: str, now: int
) -> S3Upload:
    """Start a multipart upload of ``key`` in ``bucket`` (held so it cannot go meanwhile)."""
    q = sa.select(B.c.name).where(B.c.name == bucket).with_for_update(read=True, key_share=True)
    if conn.execute(q).first() is None:
        raise S3Error("NoSuchBucket", f"no bucket {bucket!r}")
    values = {
        "upload_id": upload_id,
        "bucket": bucket,
        "key": key,
        "initiated_ns": now,
        "headers": headers,
    }
    conn.execute(U.insert().values(**values))
    return S3Upload(upload_id, bucket, key, now, _headers(headers))


def upload_get(conn: sa.Connection, upload_id: str) -> S3Upload:
    return _get_upload(conn, upload_id)


def part_put(
    conn: sa.Connection,
    upload_id: str,
    number: int,
    size: int,
    etag: str,
    pieces: Sequence[NewSlice],
    now: int,
) -> None:
    """Store (or replace) part ``number`` and its data map; last writer wins."""
    _get_upload(conn, upload_id, lock="key_share")
    values = {
        "upload_id": upload_id,
        "part_number": number,
        "size": size,
        "etag": etag,
        "created_ns": now,
    }
    _upsert(conn, P, values, ("size", "etag", "created_ns"))
    conn.execute(sa.delete(PS).where(PS.c.upload_id == upload_id, PS.c.part_number == number))
    rows = [
        {
            "upload_id": upload_id,
            "part_number": number,
            "part_off": s.file_off,
            "length": s.length,
            "extent_id": s.extent_id,
            "ext_off": s.ext_off,
        }
        for s in pieces
    ]
    if rows:
        conn.execute(PS.insert(), rows)


def _part(r: Any) -> S3Part:
    return S3Part(r.part_number, r.size, r.etag, r.created_ns)


def parts(conn: sa.Connection, upload_id: str, after: int, limit: int) -> tuple[list[S3Part], bool]:
    """Parts numbered above ``after``, at most ``limit``; True if more follow."""
    _get_upload(conn, upload_id)
    q = (
        sa.select(P)
        .where(P.c.upload_id == upload_id, P.c.part_number > after)
        .order_by(P.c.part_number)
        .limit(limit + 1)
    )
    rows = [_part(r) for r in conn.execute(q)]
    return rows[:limit], len(rows) > limit


def uploads(
    conn: sa.Connection,
    bucket: str,
    prefix: bytes,
    key_marker: bytes | None,
    id_marker: str | None,
    limit: int,
) -> tuple[list[S3Upload], bool]:
    """Uploads of ``bucket`` in (key, initiation) order after the markers (ListMultipartUploads).

    With only ``key_marker``: keys after it. With both: also the later uploads of that key
    (after the marker upload; if that upload is gone, none of that key).
    """
    where = [U.c.bucket == bucket]
    if prefix:
        where.append(U.c.key >= prefix)
        bound = _prefix_bound(prefix)
        if bound is not None:
            where.append(U.c.key < bound)
    if key_marker is not None:
        where.append(_after_marker(conn, bucket, key_marker, id_marker))
    q = (
        sa.select(U)
        .where(*where)
        .order_by(U.c.key, U.c.initiated_ns, U.c.upload_id)
        .limit(limit + 1)
    )
    rows = [_upload(r) for r in conn.execute(q)]
    if not rows and bucket_get(conn, bucket) is None:
        raise S3Error("NoSuchBucket", f"no bucket {bucket!r}")
    return rows[:limit], len(rows) > limit


def _after_marker(
    conn: sa.Connection, bucket: str, key_marker: bytes, id_marker: str | None
) -> Any:
    later_key = U.c.key > key_marker
    if not id_marker:
        return later_key
    q = sa.select(U.c.initiated_ns).where(
        U.c.upload_id == id_marker, U.c.bucket == bucket, U.c.key == key_marker
    )
    t = conn.execute(q).scalar_one_or_none()
    if t is None:
        return later_key
    same_later = sa.and_(
        U.c.key == key_marker,
        sa.or_(U.c.initiated_ns > t, sa.and_(U.c.initiated_ns == t, U.c.upload_id > id_marker)),
    )
    return sa.or_(later_key, same_later)


def _chosen_parts(
    conn: sa.Connection, upload_id: str, listed: Sequence[tuple[int, str]], min_part_bytes: int
) -> list[S3Part]:
    """The listed parts, checked as CompleteMultipartUpload requires."""
    if not listed:
        raise S3Error("MalformedXML", "the part list is empty")
    numbers = [n for n, _ in listed]
    if any(b <= a for a, b in itertools.pairwise(numbers)):
        raise S3Error("InvalidPartOrder", "part numbers must be in strictly ascending order")
    have = {
        r.part_number: _part(r)
        for r in conn.execute(sa.select(P).where(P.c.upload_id == upload_id))
    }
    chosen: list[S3Part] = []
    for n, etag in listed:
        p = have.get(n)
        if p is None or strip_etag(p.etag) != strip_etag(etag):
            raise S3Error("InvalidPart", f"part {n} was not uploaded or its ETag differs")
        chosen.append(p)
    for p in chosen[:-1]:
        if p.size < min_part_bytes:
            raise S3Error(
                "EntityTooSmall",
                f"part {p.part_number} is {p.size} bytes, under the minimum of {min_part_bytes}",
            )
    return chosen


def _part_pieces(conn: sa.Connection, upload_id: str) -> dict[int, list[NewSlice]]:
    q = sa.select(PS).where(PS.c.upload_id == upload_id).order_by(PS.c.part_number, PS.c.part_off)
    out: dict[int, list[NewSlice]] = {}
    for r in conn.execute(q):
        out.setdefault(r.part_number, []).append(
            NewSlice(r.part_off, r.length, r.extent_id, r.ext_off)
        )
    return out


@dataclasses.dataclass(frozen=True)
class Complete:
    """One CompleteMultipartUpload request."""

    upload_id: str
    parts: tuple[tuple[int, str], ...]
    min_part_bytes: int
    owner: Owner
    cond: PutConditions | None
    mtime_ns: int | None = None


def upload_complete(
    conn: sa.Connection, req: Complete, ids: IdPool, now: int, gran: int
) -> S3Object:
    """Turn the upload into its object (parts' slices concatenated), then forget it."""
    up = _get_upload(conn, req.upload_id, lock="update")
    bucket = bucket_get(conn, up.bucket)
    if bucket is None:
        raise Retry(f"bucket {up.bucket!r} of upload {req.upload_id} vanished")
    chosen = _chosen_parts(conn, req.upload_id, req.parts, req.min_part_bytes)
    pieces = _part_pieces(conn, req.upload_id)
    slices, size = concat_parts([(p.size, pieces.get(p.part_number, [])) for p in chosen])
    etag = multipart_etag([p.etag for p in chosen])
    body = Body(tuple(slices), size, etag, clean_headers(up.headers), req.mtime_ns)
    put = Put(bucket.ino, up.key, split_key(up.key), body, req.owner, req.cond)
    obj = put_object(conn, put, ids, now, gran)
    ops.delete_uploads(conn, [req.upload_id])
    return obj


def upload_abort(conn: sa.Connection, upload_id: str) -> None:
    _get_upload(conn, upload_id, lock="update")
    ops.delete_uploads(conn, [upload_id])


def uploads_expire(conn: sa.Connection, older_than_ns: int) -> int:
    """Abort every upload initiated before ``older_than_ns``; how many."""
    q = sa.select(U.c.upload_id).where(U.c.initiated_ns < older_than_ns).with_for_update()
    ids = list(conn.execute(q).scalars())
    ops.delete_uploads(conn, ids)
    return len(ids)


def check_part_number(number: int) -> None:
    if not 1 <= number <= MAX_PART_NUMBER:
        raise S3Error("InvalidArgument", f"part number {number}: 1 to {MAX_PART_NUMBER}")
