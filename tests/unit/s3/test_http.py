"""Pure request helpers of the gateway: paths, queries, ranges, names, conditions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appendfs.s3.errors import S3Error
from appendfs.s3.http import (
    check_bucket_name,
    check_key,
    etag_matches,
    parse_http_date,
    parse_query,
    parse_range,
    split_path,
    stored_headers,
)


def test_split_path() -> None:
    assert split_path(b"/") == (None, None)
    assert split_path(b"/bkt") == ("bkt", None)
    assert split_path(b"/bkt/") == ("bkt", None)
    assert split_path(b"/bkt/a/b%20c") == ("bkt", b"a/b c")
    assert split_path(b"/bkt/dir/") == ("bkt", b"dir/")
    assert split_path(b"/bkt/%E2%82%AC") == ("bkt", "€".encode())
    with pytest.raises(S3Error):
        split_path(b"bkt/x")


def test_parse_query() -> None:
    assert parse_query(b"uploads") == {"uploads": ""}
    assert parse_query(b"list-type=2&prefix=a%2Fb&delimiter=%2F") == {"list-type": "2", "prefix": "a/b",
                                                                       "delimiter": "/"}
    assert parse_query(b"") == {}


@pytest.mark.parametrize(("header", "size", "want"), [
    ("bytes=0-9", 100, (0, 10)),
    ("bytes=90-", 100, (90, 100)),
    ("bytes=-10", 100, (90, 100)),
    ("bytes=-1000", 100, (0, 100)),
    ("bytes=50-1000", 100, (50, 100)),
    ("bytes=0-1,5-6", 100, None),  # several ranges: served whole, as S3 does
    ("items=0-1", 100, None),
    ("bytes=x-y", 100, None),
])
def test_parse_range(header: str, size: int, want: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == want


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_range(header: str) -> None:
    with pytest.raises(S3Error) as e:
        parse_range(header, 100)
    assert e.value.code == "InvalidRange" and e.value.status == 416


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 10_000))
def test_range_is_within_the_object(a: int, b: int, size: int) -> None:
    try:
        r = parse_range(f"bytes={a}-{b}", size)
    except S3Error:
        assert a >= size or b < a
        return
    assert r is not None
    assert 0 <= r[0] < r[1] <= size


@pytest.mark.parametrize("name", ["abc", "my-bucket.1", "a" * 63])
def test_good_bucket_names(name: str) -> None:
    check_bucket_name(name)


@pytest.mark.parametrize("name", ["ab", "a" * 64, "Upper", "-x-", "a..b", "192.168.1.1", "xn--abc", "a_b"])
def test_bad_bucket_names(name: str) -> None:
    with pytest.raises(S3Error) as e:
        check_bucket_name(name)
    assert e.value.code == "InvalidBucketName"


@pytest.mark.parametrize("key", [b"a", b"a/b/c", b"dir/", b"x" * 255, b"a/" + b"y" * 255])
def test_good_keys(key: bytes) -> None:
    check_key(key)


@pytest.mark.parametrize(("key", "code"), [
    (b"a/../b", "InvalidArgument"), (b"..", "InvalidArgument"), (b"./a", "InvalidArgument"),
    (b"a\0b", "InvalidArgument"), (b"/a", "InvalidArgument"), (b"a//b", "InvalidArgument"),
    (b"x" * 256, "KeyTooLongError"), (b"a/" * 600, "KeyTooLongError"),
])
def test_bad_keys(key: bytes, code: str) -> None:
    with pytest.raises(S3Error) as e:
        check_key(key)
    assert e.value.code == code


def test_etag_matches() -> None:
    assert etag_matches('"abc"', "abc")
    assert etag_matches('"x", "abc"', "abc")
    assert etag_matches("W/\"abc\"", "abc")
    assert etag_matches("*", "abc")
    assert not etag_matches("*", None)
    assert not etag_matches('"abd"', "abc")


def test_http_date() -> None:
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777 * 10**9
    assert parse_http_date("not a date") is None


def test_stored_headers_keep_content_headers_and_user_metadata() -> None:
    h = {"content-type": "text/plain", "x-amz-meta-color": "blue", "authorization": "x", "x-amz-date": "y"}
    assert stored_headers(h) == {"content-type": "text/plain", "x-amz-meta-color": "blue"}
    with pytest.raises(S3Error) as e:
        stored_headers({"x-amz-meta-big": "v" * 3000})
    assert e.value.code == "MetadataTooLarge"
