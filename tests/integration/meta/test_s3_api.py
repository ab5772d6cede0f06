"""The namespace's S3 transactions on both engines: tenants, keys, buckets, objects, multipart.

Every test ends with the namespace invariant check (the ``meta`` fixture); the race test
runs on PostgreSQL only (SQLite serializes writers).
"""

from __future__ import annotations

import errno
import hashlib
import stat
import threading
import time
from collections import Counter

import pytest
import sqlalchemy as sa
from cluster import run_threads

from appendfs.meta import (
    ROOT_INO,
    FsError,
    Meta,
    NewSlice,
    PutConditions,
    S3Bucket,
    S3Error,
    S3Object,
    S3Upload,
    Segment,
    schema,
)

POLICY = b"user.appendfs.redundancy"
MIB = 1 << 20


def code(exc: pytest.ExceptionInfo[S3Error]) -> str:
    return exc.value.code


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def setup(meta: Meta, tenant: str = "alice", bucket: str = "bkt") -> S3Bucket:
    meta.s3_tenant_set(tenant, 1000, 100, 0o640, 0o750)
    return meta.s3_bucket_create(bucket, tenant)


def put(
    meta: Meta,
    b: S3Bucket,
    key: bytes,
    size: int = 10,
    *,
    extent: int = 1,
    etag: str | None = "e" * 32,
    headers: dict[str, str] | None = None,
    cond: PutConditions | None = None,
    inherit: tuple[bytes, ...] = (),
    mtime_ns: int | None = None,
) -> S3Object:
    slices = [NewSlice(0, size, extent, 0)] if size and not key.endswith(b"/") else []
    return meta.s3_put_object(
        b.ino,
        key,
        slices,
        size if slices else 0,
        uid=1000,
        gid=100,
        file_mode=0o640,
        dir_mode=0o750,
        etag=etag,
        headers=headers or {},
        cond=cond,
        inherit_xattrs=inherit,
        mtime_ns=mtime_ns,
    )


def s3_rows(meta: Meta, table: sa.Table) -> int:
    with meta.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


# --- tenants and keys --------------------------------------------------------------------------


def test_tenants_and_access_keys(meta: Meta) -> None:
    t = meta.s3_tenant_set("alice", 1000, 100)
    assert (t.file_mode, t.dir_mode) == (0o644, 0o755)
    assert meta.s3_tenant_set("alice", 1001, 101, 0o600, 0o700).uid == 1001  # upsert
    assert meta.s3_tenant("alice") == t.__class__("alice", 1001, 101, 0o600, 0o700)
    assert meta.s3_tenant("nobody") is None
    meta.s3_tenant_set("bob", 2000, 200)
    assert [x.name for x in meta.s3_tenants()] == ["alice", "bob"]

    k = meta.s3_key_create("alice")
    assert len(k.access_key) == 20 and k.access_key.isalnum() and k.access_key.isupper()
    assert len(k.secret_key) == 40 and k.tenant.uid == 1001
    given = meta.s3_key_create("bob", "AKBOB", "secret-of-bob")
    assert meta.s3_key("AKBOB") == given and given.tenant.name == "bob"
    with pytest.raises(S3Error) as e:
        meta.s3_key_create("bob", "AKBOB", "another-secret")
    assert code(e) == "InvalidArgument"
    with pytest.raises(S3Error) as e:
        meta.s3_key_create("carol")
    assert code(e) == "InvalidArgument" and "carol" in e.value.message
    with pytest.raises(S3Error):
        meta.s3_tenant_set("bad name", 1, 1)
    assert [x.access_key for x in meta.s3_keys()] == sorted([k.access_key, "AKBOB"])
    assert [x.access_key for x in meta.s3_keys("bob")] == ["AKBOB"]
    meta.s3_tenant_set("bob", 2222, 200)
    key = meta.s3_key("AKBOB")
    assert key is not None and key.tenant.uid == 2222  # the key acts as the tenant is now
    assert meta.s3_key_delete("AKBOB") is True
    assert meta.s3_key_delete("AKBOB") is False
    assert meta.s3_key("AKBOB") is None


# --- buckets -------------------------------------------------------------------------------------


def test_buckets_are_tenant_directories(meta: Meta) -> None:
    meta.setxattr(ROOT_INO, POLICY, b"ec:4+2")
    meta.s3_tenant_set("alice", 1000, 100, 0o640, 0o750)
    meta.s3_tenant_set("bob", 2000, 200)
    b = meta.s3_bucket_create("photos", "alice", inherit_xattrs=[POLICY])
    d = meta.lookup(ROOT_INO, b"photos")
    assert d.ino == b.ino and d.is_dir and (d.uid, d.gid, d.mode) == (1000, 100, 0o750)
    assert meta.getxattr(b.ino, POLICY) == b"ec:4+2"
    assert meta.s3_bucket("photos") == b and b.tenant == "alice"
    for tenant, want in (("alice", "BucketAlreadyOwnedByYou"), ("bob", "BucketAlreadyExists")):
        with pytest.raises(S3Error) as e:
            meta.s3_bucket_create("photos", tenant)
        assert code(e) == want
    meta.mkdir(ROOT_INO, b"plain", 0o755, 0, 0)  # a top-level directory that is no bucket
    with pytest.raises(S3Error) as e:
        meta.s3_bucket_create("plain", "bob")
    assert code(e) == "BucketAlreadyExists"
    for bad in ("Photos", "ab", "a_b"):
        with pytest.raises(S3Error) as e:
            meta.s3_bucket_create(bad, "bob")
        assert code(e) == "InvalidBucketName"
    with pytest.raises(S3Error) as e:
        meta.s3_bucket_create("nobodys", "nobody")
    assert code(e) == "InvalidArgument"
    meta.s3_bucket_create("zeta", "bob")
    meta.s3_bucket_create("alpha", "bob")
    assert [x.name for x in meta.s3_buckets("bob")] == ["alpha", "zeta"]
    assert [x.name for x in meta.s3_buckets("alice")] == ["photos"]
    assert meta.s3_bucket("plain") is None and meta.s3_buckets("nobody") == []


def test_bucket_delete(meta: Meta) -> None:
    b = setup(meta)
    meta.s3_tenant_set("bob", 2000, 200)
    with pytest.raises(S3Error) as e:
        meta.s3_bucket_delete("bkt", "bob")  # another tenant's bucket is not there for bob
    assert code(e) == "NoSuchBucket"
    with pytest.raises(S3Error) as e:
        meta.s3_bucket_delete("nope", "alice")
    assert code(e) == "NoSuchBucket"
    put(meta, b, b"a/b")
    with pytest.raises(S3Error) as e:
        meta.s3_bucket_delete("bkt", "alice")
    assert code(e) == "BucketNotEmpty"
    assert meta.s3_delete_object(b.ino, b"a/b")
    up = meta.s3_upload_create("bkt", b"big", {})
    meta.s3_part_put(up.upload_id, 1, 5, md5(b"x"), [NewSlice(0, 5, 9, 0)])
    meta.s3_bucket_delete("bkt", "alice")  # aborts its upload
    assert meta.s3_bucket("bkt") is None
    with pytest.raises(FsError):
        meta.lookup(ROOT_INO, b"bkt")
    with pytest.raises(S3Error) as e:
        meta.s3_upload(up.upload_id)
    assert code(e) == "NoSuchUpload"
    assert s3_rows(meta, schema.s3_part_slice) == 0
    assert meta.getattr(ROOT_INO).nlink == 2


def test_rmdir_of_a_bucket_directory_forgets_the_bucket(meta: Meta) -> None:
    b = setup(meta)
    up = meta.s3_upload_create("bkt", b"k", {})
    meta.s3_part_put(up.upload_id, 1, 5, md5(b"x"), [NewSlice(0, 5, 9, 0)])
    put(meta, b, b"d/")
    meta.s3_delete_object(b.ino, b"d/")
    meta.rmdir(ROOT_INO, b"bkt")  # through the mount
    assert meta.s3_bucket("bkt") is None and meta.s3_buckets("alice") == []
    assert s3_rows(meta, schema.s3_upload) == 0 and s3_rows(meta, schema.s3_part) == 0
    b2 = setup(meta)  # the name can be used again
    assert b2.ino != b.ino


# --- objects ------------------------------------------------------------------------------------


def test_put_and_get_object(meta: Meta) -> None:
    b = setup(meta)
    meta.setxattr(b.ino, POLICY, b"rep:2")
    meta.setxattr(b.ino, b"user.other", b"not inherited")
    slices = [NewSlice(0, 4, 7, 100), NewSlice(8, 4, 8, 0)]  # a hole in [4, 8)
    obj = meta.s3_put_object(
        b.ino,
        b"a/b/c.txt",
        slices,
        16,
        uid=1000,
        gid=100,
        file_mode=0o640,
        dir_mode=0o750,
        etag='"' + "A" * 32 + '"',
        headers={"Content-Type": "text/plain", "x-amz-meta-k": "v"},
        inherit_xattrs=[POLICY],
        mtime_ns=123_000_000_000,
    )
    assert obj.key == b"a/b/c.txt" and not obj.is_dir and obj.etag == "a" * 32
    assert obj.headers == {"content-type": "text/plain", "x-amz-meta-k": "v"}  # as stored
    a = obj.attr
    assert (a.kind, a.mode, a.uid, a.gid, a.size, a.nlink) == (
        stat.S_IFREG,
        0o640,
        1000,
        100,
        16,
        1,
    )
    assert a.mtime_ns == 123_000_000_000 and a.ctime_ns > a.mtime_ns
    assert meta.getattr(a.ino) == a
    got = meta.s3_get_object(b.ino, b"a/b/c.txt")
    assert got.attr == a and got.etag == "a" * 32
    assert got.headers == obj.headers
    assert meta.read_map(a.ino, 0, 100) == [
        Segment(0, 4, 7, 100),
        Segment(4, 4, None),
        Segment(8, 4, 8, 0),
        Segment(12, 4, None),
    ]
    assert meta.resolve_path(b"/bkt/a/b/c.txt") == a
    for d_path in (b"/bkt/a", b"/bkt/a/b"):
        d = meta.resolve_path(d_path)
        assert (d.mode, d.uid, d.gid) == (0o750, 1000, 100)
        assert meta.listxattr(d.ino) == [POLICY]
    assert meta.getxattr(a.ino, POLICY) == b"rep:2"
    dobj = meta.s3_get_object(b.ino, b"a/b/")
    assert dobj.is_dir and dobj.attr.ino == meta.resolve_path(b"/bkt/a/b").ino
    assert dobj.etag == md5(b"")
    for missing in (b"a/b", b"a/b/c.txt/", b"a/x", b"x/b/c.txt", b"a//b", b"a/b/c.txt/d"):
        with pytest.raises(S3Error) as e:
            meta.s3_get_object(b.ino, missing)
        assert code(e) == "NoSuchKey", missing
    assert [o.key for o in meta.list_subtree(b.ino).objects] == [b"a/b/c.txt"]
    assert meta.s3_object_by_ino(a.ino) == got.__class__(b"", a, "a" * 32, got.headers, False)


def test_put_reuses_unused_inode_numbers(meta: Meta) -> None:
    b = setup(meta)
    put(meta, b, b"x/y/z")
    obj = put(meta, b, b"x/y/w")  # took 3 numbers, needed 1
    assert meta.mkdir(ROOT_INO, b"after", 0o755, 0, 0).ino < obj.attr.ino + 3


def test_directory_keys(meta: Meta) -> None:
    b = setup(meta)
    d = put(meta, b, b"dir/sub/", headers={"content-type": "application/x-directory"})
    assert d.is_dir and d.etag == md5(b"") and d.attr.is_dir
    assert meta.s3_get_object(b.ino, b"dir/sub/").headers == {
        "content-type": "application/x-directory"
    }
    again = put(meta, b, b"dir/sub/")  # exists already: fine, headers replaced
    assert again.attr.ino == d.attr.ino and again.headers == {}
    assert meta.s3_get_object(b.ino, b"dir/").is_dir  # an implicit directory is a key too
    with pytest.raises(S3Error) as e:
        meta.s3_put_object(
            b.ino,
            b"dir/x/",
            [NewSlice(0, 1, 1, 0)],
            1,
            uid=0,
            gid=0,
            file_mode=0o644,
            dir_mode=0o755,
            etag=None,
            headers={},
        )
    assert code(e) == "InvalidArgument"


def test_key_conflicts_and_invalid_keys(meta: Meta) -> None:
    b = setup(meta)
    put(meta, b, b"f")
    put(meta, b, b"d/")
    put(meta, b, b"e/x")
    for key in (b"f/g", b"f/", b"d", b"e", b"f/g/h"):
        with pytest.raises(S3Error) as e:
            put(meta, b, key)
        assert code(e) == "KeyConflict", key
    for key in (b"", b"/a", b"a//b", b"a/../b", b"./a", b"a\0", b"x" * 256, b"k" * 1025):
        with pytest.raises(S3Error) as e:
            put(meta, b, key)
        assert code(e) == "InvalidKey", key
    with pytest.raises(ValueError):
        meta.s3_put_object(
            b.ino,
            b"k",
            [NewSlice(0, 11, 1, 0)],
            10,
            uid=0,
            gid=0,
            file_mode=0o644,
            dir_mode=0o755,
            etag=None,
            headers={},
        )
    with pytest.raises(S3Error) as e:
        put(meta, b, b"k", headers={"x-amz-meta-big": "x" * 20_000})
    assert code(e) == "MetadataTooLarge"
    gone = meta.mkdir(ROOT_INO, b"gone", 0o755, 0, 0)
    meta.rmdir(ROOT_INO, b"gone")
    for key in (b"k", b"a/k", b"a/"):
        with pytest.raises(S3Error) as e:
            put(meta, S3Bucket("gone", gone.ino, "alice", 0), key)
        assert code(e) == "NoSuchBucket"
    with pytest.raises(S3Error) as e:
        meta.s3_get_object(gone.ino, b"k")
    assert code(e) == "NoSuchBucket"
    assert [o.key for o in meta.list_subtree(b.ino).objects] == [b"e/x", b"f"]


def test_replace_is_atomic_and_the_old_file_goes_like_rename_over(meta: Meta) -> None:
    b = setup(meta)
    v1 = put(meta, b, b"k", 10, extent=1)
    v2 = put(meta, b, b"k", 20, extent=2)
    assert v2.attr.ino != v1.attr.ino
    assert meta.resolve_path(b"/bkt/k").ino == v2.attr.ino
    with pytest.raises(FsError) as e:
        meta.getattr(v1.attr.ino)
    assert e.value.errno == errno.ENOENT
    assert (v1.attr.ino, 10) in [(ino, size) for ino, size, _ in meta.delete_queue()]
    assert meta.read_map(v2.attr.ino, 0, 100) == [Segment(0, 20, 2, 0)]

    # Held open by a session: the old inode survives unlinked until the last close.
    sid = meta.open_session("test")
    meta.open(sid, v2.attr.ino)
    v3 = put(meta, b, b"k", 30, extent=3)
    held = meta.getattr(v2.attr.ino)
    assert held.nlink == 0 and meta.read_map(v2.attr.ino, 0, 100) == [Segment(0, 20, 2, 0)]
    assert meta.check_invariants() == []
    meta.release(sid, v2.attr.ino)
    with pytest.raises(FsError):
        meta.getattr(v2.attr.ino)

    # A second hard link keeps the old inode alive with one link less.
    meta.link(v3.attr.ino, b.ino, b"other-name")
    v4 = put(meta, b, b"k", 40, extent=4)
    assert meta.getattr(v3.attr.ino).nlink == 1
    assert meta.s3_get_object(b.ino, b"other-name").attr.ino == v3.attr.ino
    assert meta.s3_get_object(b.ino, b"k").attr.ino == v4.attr.ino
    meta.close_session(sid)
    assert s3_rows(meta, schema.s3_object) == 2  # v3 and v4: the others went with their inodes


def test_etag_is_valid_only_for_its_generation(meta: Meta) -> None:
    b = setup(meta)
    obj = put(meta, b, b"k", 10, etag=md5(b"v1"), headers={"content-type": "a/b"})
    assert meta.s3_etags([obj.attr.ino]) == {obj.attr.ino: md5(b"v1")}
    after = meta.commit_slices(obj.attr.ino, [NewSlice(10, 5, 9, 0)])  # a write via the mount
    assert after.gen > obj.attr.gen and after.size == 15
    got = meta.s3_get_object(b.ino, b"k")
    assert got.etag is None and got.headers == {"content-type": "a/b"}
    assert meta.s3_etags([obj.attr.ino]) == {}
    assert meta.s3_set_etag(obj.attr.ino, obj.attr.gen, "f" * 32) is False  # stale gen
    assert meta.s3_set_etag(obj.attr.ino, after.gen, f'"{md5(b"v2")}"') is True
    got = meta.s3_get_object(b.ino, b"k")
    assert got.etag == md5(b"v2") and got.headers == {"content-type": "a/b"}
    assert meta.s3_set_etag(12345678, 0, md5(b"")) is False  # no such inode
    d = put(meta, b, b"d/")
    assert meta.s3_set_etag(d.attr.ino, d.attr.gen, md5(b"x")) is False  # directories: constant
    # A file created through the mount has no S3 row until its ETag is computed.
    f = meta.create(b.ino, b"posix", 0o644, 0, 0)
    assert meta.s3_get_object(b.ino, b"posix").etag is None
    assert meta.s3_get_object(b.ino, b"posix").headers == {}
    assert meta.s3_set_etag(f.ino, f.gen, md5(b"")) is True
    assert meta.s3_get_object(b.ino, b"posix").etag == md5(b"")


def test_conditional_puts(meta: Meta) -> None:
    b = setup(meta)
    e1 = md5(b"one")

    def cput(key: bytes, cond: PutConditions, etag: str = e1) -> S3Object:
        return put(meta, b, key, etag=etag, cond=cond)

    first = cput(b"k", PutConditions(if_none_match="*"))
    with pytest.raises(S3Error) as e:
        cput(b"k", PutConditions(if_none_match="*"))
    assert code(e) == "PreconditionFailed"
    with pytest.raises(S3Error) as e:
        cput(b"missing", PutConditions(if_match=e1))
    assert code(e) == "NoSuchKey"
    with pytest.raises(S3Error) as e:
        cput(b"k", PutConditions(if_match=md5(b"other")))
    assert code(e) == "PreconditionFailed"
    with pytest.raises(S3Error) as e:
        cput(b"k", PutConditions(if_none_match=f'"{e1}"'))
    assert code(e) == "PreconditionFailed"
    second = cput(b"k", PutConditions(if_match=f'"{e1}"'), etag=md5(b"two"))
    assert meta.s3_get_object(b.ino, b"k").attr.ino == second.attr.ino != first.attr.ino
    cput(b"k", PutConditions(if_match="*"), etag=md5(b"two"))

    # Written through the mount: the condition needs an ETag nobody knows yet.
    cur = meta.s3_get_object(b.ino, b"k")
    changed = meta.commit_slices(cur.attr.ino, [NewSlice(0, 3, 5, 0)])
    with pytest.raises(S3Error) as e:
        cput(b"k", PutConditions(if_match=md5(b"two")))
    assert code(e) == "EtagUnknown" and e.value.ino == cur.attr.ino
    assert meta.s3_get_object(b.ino, b"k").attr.ino == cur.attr.ino  # nothing changed
    meta.s3_set_etag(cur.attr.ino, changed.gen, md5(b"three"))
    with pytest.raises(S3Error) as e:
        cput(b"k", PutConditions(if_match=md5(b"two")))
    assert code(e) == "PreconditionFailed"
    cput(b"k", PutConditions(if_match=md5(b"three")))

    # Directory keys: the directory is the object (ETag of nothing).
    with pytest.raises(S3Error) as e:
        put(meta, b, b"d/", cond=PutConditions(if_match="*"))
    assert code(e) == "NoSuchKey"
    put(meta, b, b"d/", cond=PutConditions(if_none_match="*"))
    with pytest.raises(S3Error) as e:
        put(meta, b, b"d/", cond=PutConditions(if_none_match="*"))
    assert code(e) == "PreconditionFailed"
    put(meta, b, b"d/", cond=PutConditions(if_match=md5(b"")))


def test_delete_object_prunes_empty_directories(meta: Meta) -> None:
    b = setup(meta)
    assert meta.s3_delete_object(b.ino, b"nothing") is False
    assert meta.s3_delete_object(b.ino, b"a//b") is False  # not a valid key: nothing there
    put(meta, b, b"a/b/c/f1")
    put(meta, b, b"a/g")
    put(meta, b, b"m/")  # PUT as a key of its own: stays when emptied
    put(meta, b, b"m/n/f2")
    assert meta.s3_delete_object(b.ino, b"a/b/c") is False  # a directory named as a file
    assert meta.s3_delete_object(b.ino, b"a/g/") is False  # a file named as a directory
    assert meta.s3_delete_object(b.ino, b"a/b/c/f1") is True
    assert [e.name for e in meta.readdir(meta.resolve_path(b"/bkt/a").ino)] == [b"g"]
    assert meta.s3_delete_object(b.ino, b"a/b/c/f1") is False
    assert meta.s3_delete_object(b.ino, b"a/g") is True
    assert [e.name for e in meta.readdir(b.ino)] == [b"m"]  # a/ went, the bucket stays
    assert meta.s3_delete_object(b.ino, b"m/n/f2") is True
    assert [e.name for e in meta.readdir(meta.resolve_path(b"/bkt/m").ino)] == []
    put(meta, b, b"m/x")
    with pytest.raises(S3Error) as e:
        meta.s3_delete_object(b.ino, b"m/")
    assert code(e) == "KeyConflict"
    meta.s3_delete_object(b.ino, b"m/x")
    assert meta.s3_delete_object(b.ino, b"m/") is True
    assert meta.readdir(b.ino) == []
    assert s3_rows(meta, schema.s3_object) == 0
    # An open file is kept, unlinked, until its last close.
    obj = put(meta, b, b"open/f")
    sid = meta.open_session("test")
    meta.open(sid, obj.attr.ino)
    assert meta.s3_delete_object(b.ino, b"open/f") is True
    assert meta.getattr(obj.attr.ino).nlink == 0 and meta.readdir(b.ino) == []
    meta.close_session(sid)
    with pytest.raises(FsError):
        meta.getattr(obj.attr.ino)


# --- multipart uploads ------------------------------------------------------------------------


def complete(
    meta: Meta, upload_id: str, listed: list[tuple[int, str]], cond: PutConditions | None = None
) -> S3Object:
    return meta.s3_upload_complete(
        upload_id,
        listed,
        min_part_bytes=5 * MIB,
        uid=0,
        gid=0,
        file_mode=0o644,
        dir_mode=0o755,
        cond=cond,
    )


def _upload_parts(meta: Meta, upload_id: str) -> dict[int, str]:
    """Parts 1 (two pieces), 2 (replaced once), 3 (short, last): {number: etag}."""
    etags = {n: md5(b"part%d" % n) for n in (1, 2, 3)}
    meta.s3_part_put(
        upload_id,
        1,
        5 * MIB,
        etags[1],
        [NewSlice(0, 3 * MIB, 11, 0), NewSlice(3 * MIB, 2 * MIB, 12, 0)],
    )
    meta.s3_part_put(upload_id, 2, 5 * MIB, md5(b"old"), [NewSlice(0, 5 * MIB, 99, 0)])
    meta.s3_part_put(upload_id, 2, 6 * MIB, etags[2], [NewSlice(0, 6 * MIB, 13, 64)])
    meta.s3_part_put(upload_id, 3, 1000, f'"{etags[3]}"', [NewSlice(0, 1000, 14, 0)])
    return etags


def test_multipart_upload_completes_by_concatenating_slices(meta: Meta) -> None:
    b = setup(meta)
    put(meta, b, b"dir/big", 3)  # replaced by the completed upload
    up = meta.s3_upload_create("bkt", b"dir/big", {"content-type": "video/mp4"})
    assert len(up.upload_id) == 32 and int(up.upload_id, 16) >= 0
    assert meta.s3_upload(up.upload_id) == up and up.headers == {"content-type": "video/mp4"}
    etags = _upload_parts(meta, up.upload_id)
    parts, more = meta.s3_parts(up.upload_id)
    assert [(p.part_number, p.size, p.etag) for p in parts] == [
        (1, 5 * MIB, etags[1]),
        (2, 6 * MIB, etags[2]),
        (3, 1000, etags[3]),
    ] and not more
    page, more = meta.s3_parts(up.upload_id, after_part=1, max_parts=1)
    assert [p.part_number for p in page] == [2] and more
    before = time.time_ns()
    obj = meta.s3_upload_complete(
        up.upload_id,
        [(1, f'"{etags[1]}"'), (2, etags[2]), (3, etags[3])],
        min_part_bytes=5 * MIB,
        uid=1000,
        gid=100,
        file_mode=0o640,
        dir_mode=0o750,
    )
    size = 11 * MIB + 1000
    want_etag = hashlib.md5(b"".join(bytes.fromhex(etags[n]) for n in (1, 2, 3))).hexdigest()
    assert obj.etag == f"{want_etag}-3" and obj.headers == {"content-type": "video/mp4"}
    assert obj.attr.size == size and obj.attr.mtime_ns >= before and obj.attr.uid == 1000
    attr, slices = meta.slices(obj.attr.ino)
    assert attr == obj.attr == meta.s3_get_object(b.ino, b"dir/big").attr
    assert [(s.file_off, s.length, s.extent_id, s.ext_off) for s in slices] == [
        (0, 3 * MIB, 11, 0),
        (3 * MIB, 2 * MIB, 12, 0),
        (5 * MIB, 6 * MIB, 13, 64),
        (11 * MIB, 1000, 14, 0),
    ]
    assert meta.read_map(obj.attr.ino, 5 * MIB - 1, 2) == [
        Segment(5 * MIB - 1, 1, 12, 2 * MIB - 1),
        Segment(5 * MIB, 1, 13, 64),
    ]
    assert meta.s3_get_object(b.ino, b"dir/big").etag == obj.etag
    with pytest.raises(S3Error) as e:
        meta.s3_upload(up.upload_id)
    assert code(e) == "NoSuchUpload"
    assert s3_rows(meta, schema.s3_part) == 0 and s3_rows(meta, schema.s3_part_slice) == 0


def test_multipart_errors(meta: Meta) -> None:
    b = setup(meta)
    up = meta.s3_upload_create("bkt", b"k", {})
    etags = _upload_parts(meta, up.upload_id)
    cases = [
        ([], "MalformedXML"),
        ([(2, etags[2]), (1, etags[1])], "InvalidPartOrder"),
        ([(1, etags[1]), (1, etags[1])], "InvalidPartOrder"),
        ([(1, etags[1]), (4, etags[1])], "InvalidPart"),
        ([(1, etags[2]), (2, etags[2])], "InvalidPart"),
        ([(1, etags[1]), (3, etags[3]), (2, etags[2])], "InvalidPartOrder"),
        ([(3, etags[3]), (4, "x")], "InvalidPart"),
    ]
    for listed, want in cases:
        with pytest.raises(S3Error) as e:
            complete(meta, up.upload_id, listed)
        assert code(e) == want, listed
    put(meta, b, b"k", 1)
    with pytest.raises(S3Error) as e:
        complete(
            meta,
            up.upload_id,
            [(1, etags[1]), (2, etags[2])],
            cond=PutConditions(if_none_match="*"),
        )
    assert code(e) == "PreconditionFailed"
    assert meta.s3_upload(up.upload_id) == up  # a failed completion changes nothing
    meta.s3_upload_abort(up.upload_id)
    for call in (
        lambda: meta.s3_upload_abort(up.upload_id),
        lambda: meta.s3_part_put(up.upload_id, 1, 1, md5(b""), []),
        lambda: meta.s3_parts(up.upload_id),
        lambda: complete(meta, up.upload_id, [(1, etags[1])]),
    ):
        with pytest.raises(S3Error) as e:
            call()
        assert code(e) == "NoSuchUpload"
    with pytest.raises(S3Error) as e:
        meta.s3_upload_create("nope", b"k", {})
    assert code(e) == "NoSuchBucket"
    for key in (b"dir/", b"a//b"):
        with pytest.raises(S3Error) as e:
            meta.s3_upload_create("bkt", key, {})
        assert code(e) == "InvalidKey"
    up2 = meta.s3_upload_create("bkt", b"k2", {})
    for n in (0, 10_001):
        with pytest.raises(S3Error) as e:
            meta.s3_part_put(up2.upload_id, n, 1, md5(b""), [])
        assert code(e) == "InvalidArgument"
    with pytest.raises(ValueError):
        meta.s3_part_put(up2.upload_id, 1, 10, md5(b""), [NewSlice(0, 11, 1, 0)])
    # A conflicting key at completion time: nothing is lost, the upload stays.
    meta.s3_part_put(up2.upload_id, 1, 10, md5(b"p"), [NewSlice(0, 10, 1, 0)])
    put(meta, b, b"k2/")
    with pytest.raises(S3Error) as e:
        complete(meta, up2.upload_id, [(1, md5(b"p"))])
    assert code(e) == "KeyConflict"
    assert meta.s3_upload(up2.upload_id).key == b"k2"


def test_entity_too_small(meta: Meta) -> None:
    setup(meta)
    up = meta.s3_upload_create("bkt", b"k", {})
    etags = _upload_parts(meta, up.upload_id)
    meta.s3_part_put(up.upload_id, 4, 10, md5(b"4"), [NewSlice(0, 10, 1, 0)])
    with pytest.raises(S3Error) as e:  # part 3 (1000 bytes) is not the last one
        complete(meta, up.upload_id, [(1, etags[1]), (3, etags[3]), (4, md5(b"4"))])
    assert code(e) == "EntityTooSmall"
    # Short as the last part, and parts left out (2 and 4) are dropped with the upload.
    obj = complete(meta, up.upload_id, [(1, etags[1]), (3, etags[3])])
    assert obj.attr.size == 5 * MIB + 1000 and obj.etag is not None and obj.etag.endswith("-2")
    assert s3_rows(meta, schema.s3_part_slice) == 0


def test_upload_listing_and_expiry(meta: Meta) -> None:
    setup(meta)
    setup(meta, "bob", "other")
    meta.s3_upload_create("other", b"a", {})
    made = [meta.s3_upload_create("bkt", k, {}) for k in (b"b/1", b"a", b"b/2", b"a", b"c")]
    ups, more = meta.s3_uploads("bkt")
    assert [(u.key, u.upload_id) for u in ups] == sorted(
        ((u.key, u.upload_id) for u in made), key=lambda x: (x[0], made_order(made, x[1]))
    ) and not more
    assert [u.key for u in meta.s3_uploads("bkt", prefix=b"b/")[0]] == [b"b/1", b"b/2"]
    assert [u.key for u in meta.s3_uploads("bkt", key_marker=b"a")[0]] == [b"b/1", b"b/2", b"c"]
    first_a = ups[0]
    after = meta.s3_uploads("bkt", key_marker=b"a", upload_id_marker=first_a.upload_id)[0]
    assert [u.key for u in after] == [b"a", b"b/1", b"b/2", b"c"] and after[0] == ups[1]
    page, more = meta.s3_uploads("bkt", max_uploads=2)
    assert page == ups[:2] and more
    assert meta.s3_uploads("bkt", prefix=b"zzz") == ([], False)
    with pytest.raises(S3Error) as e:
        meta.s3_uploads("nope")
    assert code(e) == "NoSuchBucket"
    meta.s3_part_put(made[0].upload_id, 1, 5, md5(b"x"), [NewSlice(0, 5, 1, 0)])
    cutoff = made[2].initiated_ns + 1
    assert meta.s3_uploads_expire(cutoff) == 4  # other/a and the first three of bkt
    assert [u.key for u in meta.s3_uploads("bkt")[0]] == [b"a", b"c"]
    assert meta.s3_uploads("other") == ([], False)
    assert s3_rows(meta, schema.s3_part_slice) == 0
    assert meta.s3_uploads_expire(cutoff) == 0


def made_order(made: list[S3Upload], upload_id: str) -> int:
    return [u.upload_id for u in made].index(upload_id)


# --- the invariant checker ------------------------------------------------------------------------


def test_check_reports_stale_s3_rows(meta: Meta) -> None:
    b = setup(meta)
    obj = put(meta, b, b"k")
    with meta.engine.begin() as c:
        c.execute(sa.update(schema.s3_object).values(gen=obj.attr.gen + 5))
    assert any("s3_object of inode" in p for p in meta.check_invariants())
    with meta.engine.begin() as c:
        c.execute(sa.update(schema.s3_object).values(gen=obj.attr.gen))
    assert meta.check_invariants() == []


# --- races (PostgreSQL) -------------------------------------------------------------------------


def test_concurrent_puts_and_deletes_of_one_key(pg_meta: Meta) -> None:
    b = setup(pg_meta)
    errors: list[BaseException] = []
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for n in range(40):
                key = b"deep/dir/k" if n % 2 else b"deep/k"
                if i == 3 and n % 4 == 0:
                    pg_meta.s3_delete_object(b.ino, key)
                    what = "delete"
                else:
                    obj = put(pg_meta, b, key, 10 + i, extent=100 * i + n)
                    assert obj.attr.size == 10 + i
                    what = "put"
                with lock:
                    seen[what] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen["put"] == 150 and seen["delete"] == 10
    assert pg_meta.check_invariants() == []
    live = [o.key for o in pg_meta.list_subtree(b.ino).objects]
    assert set(live) <= {b"deep/k", b"deep/dir/k"}
    for key in live:
        obj = pg_meta.s3_get_object(b.ino, key)
        [seg] = pg_meta.read_map(obj.attr.ino, 0, 100)
        assert seg.length == obj.attr.size  # the slices of exactly one PUT
    # Every replaced or deleted file went to the delete queue: only the live ones remain.
    with pg_meta.engine.connect() as c:
        files = c.execute(
            sa.select(sa.func.count()).where(schema.inode.c.kind == stat.S_IFREG)
        ).scalar_one()
    assert files == len(live)


def test_if_none_match_creates_exactly_once(pg_meta: Meta) -> None:
    b = setup(pg_meta)

    def worker(i: int) -> Counter[str]:
        c: Counter[str] = Counter()
        for k in range(25):
            try:
                put(pg_meta, b, b"once/%d/k" % k, 1 + i, cond=PutConditions(if_none_match="*"))
                c["made"] += 1
            except S3Error as e:
                assert e.code == "PreconditionFailed"
                c["refused"] += 1
        return c

    total: Counter[str] = Counter()
    for c in run_threads(5, worker):
        total.update(c)
    assert total == Counter(made=25, refused=100)
    assert pg_meta.check_invariants() == []


def test_puts_and_deletes_across_shared_directories(pg_meta: Meta) -> None:
    """Creates of missing directories race with the pruning of emptied ones."""
    b = setup(pg_meta)

    def worker(i: int) -> int:
        done = 0
        for n in range(30):
            key = b"t/%d/x/f%d" % (n % 3, i)
            put(pg_meta, b, key, 5, extent=i)
            done += pg_meta.s3_delete_object(b.ino, key)
        return done

    assert run_threads(5, worker) == [30] * 5
    assert pg_meta.check_invariants() == []
    assert pg_meta.list_subtree(b.ino).objects == []
