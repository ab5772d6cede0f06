"""Pure helpers of the namespace's S3 transactions: key splitting, names, conditions, ETags."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appendfs.meta import NewSlice, PutConditions, S3Error
from appendfs.meta import s3 as m


def code(exc: pytest.ExceptionInfo[S3Error]) -> str:
    return exc.value.code


@pytest.mark.parametrize(
    ("key", "dirs", "leaf"),
    [
        (b"a", (), b"a"),
        (b"a/b/c", (b"a", b"b"), b"c"),
        (b"a/", (b"a",), None),
        (b"a/b/", (b"a", b"b"), None),
        (b"x" * 255, (), b"x" * 255),
        (b"...", (), b"..."),
        (b"a/.b/c.", (b"a", b".b"), b"c."),
        ("é/ü".encode(), ("é".encode(),), "ü".encode()),
    ],
)
def test_split_key_valid(key: bytes, dirs: tuple[bytes, ...], leaf: bytes | None) -> None:
    p = m.split_key(key)
    assert (p.dirs, p.leaf, p.is_dir) == (dirs, leaf, leaf is None)


@pytest.mark.parametrize(
    "key",
    [
        b"",
        b"/",
        b"/a",
        b"a//b",
        b"a/./b",
        b"a/../b",
        b".",
        b"..",
        b"a/..",
        b"../",
        b"a\0b",
        b"x" * 256,
        b"a/" + b"x" * 256 + b"/c",
        b"a/" * 512 + b"b",  # 1025 bytes
        b"a//",
    ],
)
def test_split_key_invalid(key: bytes) -> None:
    with pytest.raises(S3Error) as e:
        m.split_key(key)
    assert code(e) == "InvalidKey"


def test_split_key_length_limit() -> None:
    assert m.split_key(b"a/" * 511 + b"bc").leaf == b"bc"  # 1024 bytes
    with pytest.raises(S3Error):
        m.split_key(b"a/" * 511 + b"bcd")


@given(
    st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda c: b"/" not in c), min_size=1, max_size=8
    ),
    st.booleans(),
)
def test_split_key_round_trip(parts: list[bytes], is_dir: bool) -> None:
    key = b"/".join(parts) + (b"/" if is_dir else b"")
    try:
        p = m.split_key(key)
    except S3Error:
        assert any(c in (b".", b"..") or b"\0" in c for c in parts)
        return
    assert b"/".join((*p.dirs, *((p.leaf,) if p.leaf else ()))) + (b"/" if p.is_dir else b"") == key


@pytest.mark.parametrize("name", ["abc", "a-b.c", "a" * 63, "0bucket9", "my.bucket.1"])
def test_bucket_names_valid(name: str) -> None:
    assert m.check_bucket_name(name) == name.encode()


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "a" * 64,
        "Abc",
        "a_b",
        "-ab",
        "ab-",
        "a..b",
        "192.168.1.1",
        "xn--abc",
        "ab-s3alias",
        "a/b",
        ".ab",
        "",
    ],
)
def test_bucket_names_invalid(name: str) -> None:
    with pytest.raises(S3Error) as e:
        m.check_bucket_name(name)
    assert code(e) == "InvalidBucketName"


def test_etag_comparison_ignores_quotes_and_weakness() -> None:
    assert m.strip_etag(' "ABCdef" ') == "abcdef"
    assert m.strip_etag('W/"abc"') == "abc"
    assert m.etag_listed('"x", "abc"', "abc")
    assert m.etag_listed("abc", '"abc"')
    assert not m.etag_listed('"abd"', "abc")


def test_conditions() -> None:
    ok = m.check_conditions
    ok(None, True, None, 1)
    ok(PutConditions(if_none_match="*"), False, None, 0)
    ok(PutConditions(if_match="*"), True, None, 7)
    ok(PutConditions(if_match='"e1"'), True, "e1", 7)
    ok(PutConditions(if_none_match="e2"), True, "e1", 7)
    ok(PutConditions(if_none_match="e2"), False, None, 0)
    cases = [
        (PutConditions(if_none_match="*"), True, "e1", "PreconditionFailed"),
        (PutConditions(if_match="e1"), False, None, "NoSuchKey"),
        (PutConditions(if_match="*"), False, None, "NoSuchKey"),
        (PutConditions(if_match="e2"), True, "e1", "PreconditionFailed"),
        (PutConditions(if_match="e1"), True, None, "EtagUnknown"),
        (PutConditions(if_none_match="e1"), True, None, "EtagUnknown"),
        (PutConditions(if_none_match="e1"), True, "e1", "PreconditionFailed"),
        (PutConditions(if_match="e1", if_none_match="e1"), True, "e1", "PreconditionFailed"),
    ]
    for cond, exists, etag, want in cases:
        with pytest.raises(S3Error) as e:
            ok(cond, exists, etag, 7)
        assert code(e) == want, (cond, exists, etag)
        if want == "EtagUnknown":
            assert e.value.ino == 7


def test_multipart_etag_is_md5_of_md5s() -> None:
    parts = [b"hello", b"world", b"!"]
    md5s = [hashlib.md5(p).hexdigest() for p in parts]
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    assert m.multipart_etag(md5s) == want
    assert m.multipart_etag([f'"{e.upper()}"' for e in md5s]) == want


def test_concat_parts_offsets() -> None:
    parts = [
        (10, [NewSlice(0, 4, 1, 0), NewSlice(4, 6, 2, 100)]),
        (5, [NewSlice(0, 5, 3, 7)]),
        (8, [NewSlice(2, 6, 4, 0)]),  # a hole at the start of the last part
    ]
    slices, size = m.concat_parts(parts)
    assert size == 23
    assert slices == [
        NewSlice(0, 4, 1, 0),
        NewSlice(4, 6, 2, 100),
        NewSlice(10, 5, 3, 7),
        NewSlice(17, 6, 4, 0),
    ]


def test_slice_and_piece_checks() -> None:
    m.check_slices([NewSlice(0, 10, 1, 0)], 10)
    with pytest.raises(ValueError):
        m.check_slices([NewSlice(5, 10, 1, 0)], 10)
    m.check_pieces([NewSlice(5, 5, 1, 0), NewSlice(0, 5, 1, 9)], 10)
    with pytest.raises(ValueError, match="overlap"):
        m.check_pieces([NewSlice(0, 6, 1, 0), NewSlice(5, 5, 1, 9)], 10)
    assert m.check_md5('"' + "A" * 32 + '"') == "a" * 32
    with pytest.raises(ValueError):
        m.check_md5("abc-2")


def test_headers_json() -> None:
    clean = m.clean_headers({"Content-Type": "text/plain", "x-amz-meta-a": "1"})
    assert clean == {"content-type": "text/plain", "x-amz-meta-a": "1"}
    assert m.headers_json(clean) == '{"content-type":"text/plain","x-amz-meta-a":"1"}'
    with pytest.raises(S3Error) as e:
        m.clean_headers({"x-amz-meta-big": "x" * m.HEADERS_MAX})
    assert code(e) == "MetadataTooLarge"


def test_prefix_bound() -> None:
    assert m._prefix_bound(b"ab") == b"ac"
    assert m._prefix_bound(b"a\xff") == b"b"
    assert m._prefix_bound(b"\xff\xff") is None


class _FixedRandom:
    def __init__(self) -> None:
        self.n = 0

    def choice(self, seq: str) -> str:
        self.n += 1
        return seq[self.n % len(seq)]


def test_generated_credentials() -> None:
    a, s = m.new_access_key(_FixedRandom()), m.new_secret_key(_FixedRandom())
    assert len(a) == 20 and a.isalnum() and a.upper() == a
    assert len(s) == 40 and s.isalnum()
    m.check_credentials(a, s)
    with pytest.raises(S3Error):
        m.check_credentials("a/b", s)
    with pytest.raises(S3Error):
        m.check_credentials(a, "short")


def test_id_pool() -> None:
    pool = m.IdPool([5, 6, 7])
    assert pool.take() == 5
    pool.restart()
    assert pool.take() == 5 and pool.take() == 6
    assert pool.unused() == [7]
