"""Buckets, tenants and listings (v2 and v1) through boto3 against a real gateway."""

from __future__ import annotations

import itertools
import urllib.parse

import pytest
from botocore.exceptions import ClientError
from s3gw import S3Env

_n = itertools.count()


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_bucket_lifecycle(s3env: S3Env) -> None:
    s3 = s3env.s3
    name = f"life-{next(_n)}-{s3env.engine[:2]}"
    s3.create_bucket(Bucket=name)
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket=name)
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket=name)
    assert code(e) == "BucketAlreadyOwnedByYou"
    assert s3.get_bucket_location(Bucket=name).get("LocationConstraint") in (None, "")
    assert "Status" not in s3.get_bucket_versioning(Bucket=name)
    s3.put_object(Bucket=name, Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket=name)
    assert code(e) == "BucketNotEmpty"
    s3.delete_object(Bucket=name, Key="k")
    s3.delete_bucket(Bucket=name)
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket=name)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=name, Key="k", Body=b"x")
    assert code(e) == "NoSuchBucket"


@pytest.mark.parametrize("name", ["ab", "UPPER", "under_score", "-dash"])
def test_bad_bucket_names(s3env: S3Env, name: str) -> None:
    with pytest.raises(Exception) as e:  # botocore refuses some names itself (ParamValidationError)
        s3env.s3.create_bucket(Bucket=name)
    if isinstance(e.value, ClientError):
        assert e.value.response["Error"]["Code"] == "InvalidBucketName"


def test_tenants_are_isolated(s3env: S3Env, bucket: str) -> None:
    other_key = s3env.gw.new_key(f"other{next(_n)}", "--uid", "1234", "--gid", "4321")
    other = s3env.gw.client(other_key)
    s3env.s3.put_object(Bucket=bucket, Key="secret", Body=b"mine")
    assert bucket not in [b["Name"] for b in other.list_buckets()["Buckets"]]
    for call in (lambda: other.get_object(Bucket=bucket, Key="secret"),
                 lambda: other.put_object(Bucket=bucket, Key="x", Body=b"theirs"),
                 lambda: other.list_objects_v2(Bucket=bucket),
                 lambda: other.delete_object(Bucket=bucket, Key="secret"),
                 lambda: other.delete_bucket(Bucket=bucket)):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as e:
        other.create_bucket(Bucket=bucket)
    assert code(e) == "BucketAlreadyExists"
    assert [o["Key"] for o in s3env.s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["secret"]
    mine = f"theirs-{next(_n)}"
    other.create_bucket(Bucket=mine)
    other.put_object(Bucket=mine, Key="f", Body=b"z")
    if s3env.mount is not None:
        st = (s3env.mount.path / mine / "f").stat()
        assert (st.st_uid, st.st_gid) == (1234, 4321)


KEYS = ["a", "a.txt", "a/b", "a/c/d", "a/c/e", "a0", "b/x", "b/y/z", "c", "d/e/f/g", "é/x", "sp ace"]


@pytest.fixture
def filled(s3env: S3Env, bucket: str) -> str:
    for k in KEYS[1:]:  # "a" is a directory here (a/b exists), so not a key itself
        s3env.s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    return bucket


def byte_order(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


def test_list_v2_all_and_paged(s3env: S3Env, filled: str) -> None:
    s3 = s3env.s3
    want = byte_order(KEYS[1:])
    r = s3.list_objects_v2(Bucket=filled)
    assert [o["Key"] for o in r["Contents"]] == want
    assert all(o["Size"] == len(o["Key"].encode()) for o in r["Contents"])
    got: list[str] = []
    token = None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = s3.list_objects_v2(Bucket=filled, MaxKeys=3, **kw)
        got += [o["Key"] for o in r.get("Contents", [])]
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert got == want
    paginator = s3.get_paginator("list_objects_v2")
    assert [o["Key"] for p in paginator.paginate(Bucket=filled, PaginationConfig={"PageSize": 2})
            for o in p.get("Contents", [])] == want


def test_list_v2_prefix_delimiter_start_after(s3env: S3Env, filled: str) -> None:
    s3 = s3env.s3
    r = s3.list_objects_v2(Bucket=filled, Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == byte_order(["a.txt", "a0", "c", "sp ace"])
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == byte_order(["a/", "b/", "d/", "é/"])
    r = s3.list_objects_v2(Bucket=filled, Prefix="a/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["a/b"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/c/"]
    r = s3.list_objects_v2(Bucket=filled, Prefix="a")
    assert [o["Key"] for o in r["Contents"]] == byte_order(["a.txt", "a/b", "a/c/d", "a/c/e", "a0"])
    r = s3.list_objects_v2(Bucket=filled, StartAfter="a/c/d")
    assert [o["Key"] for o in r["Contents"]] == [k for k in byte_order(KEYS[1:]) if k.encode() > b"a/c/d"]
    r = s3.list_objects_v2(Bucket=filled, MaxKeys=0)
    assert r["KeyCount"] == 0
    r = s3.list_objects_v2(Bucket=filled, Prefix="nothing")
    assert "Contents" not in r


def test_list_v2_url_encoding(s3env: S3Env, filled: str) -> None:
    r = s3env.s3.list_objects_v2(Bucket=filled, EncodingType="url", Prefix="é")
    # asked for explicitly, the encoding reaches the caller (boto3 decodes only its own)
    assert [o["Key"] for o in r["Contents"]] == ["%C3%A9/x"]
    raw = s3env.s3.list_objects_v2(Bucket=filled, Prefix="sp")
    assert [o["Key"] for o in raw["Contents"]] == ["sp ace"]
    assert urllib.parse.quote("sp ace") == "sp%20ace"


def test_list_v1(s3env: S3Env, filled: str) -> None:
    s3 = s3env.s3
    r = s3.list_objects(Bucket=filled)
    assert [o["Key"] for o in r["Contents"]] == byte_order(KEYS[1:])
    got: list[str] = []
    marker = ""
    while True:
        r = s3.list_objects(Bucket=filled, Marker=marker, MaxKeys=4)
        got += [o["Key"] for o in r.get("Contents", [])]
        if not r["IsTruncated"]:
            break
        marker = r.get("NextMarker") or r["Contents"][-1]["Key"]
    assert got == byte_order(KEYS[1:])
    r = s3.list_objects(Bucket=filled, Delimiter="/", Prefix="b/")
    assert [o["Key"] for o in r["Contents"]] == ["b/x"] and [p["Prefix"] for p in r["CommonPrefixes"]] == ["b/y/"]


def test_listing_etags_are_md5(s3env: S3Env, filled: str) -> None:
    import hashlib

    r = s3env.s3.list_objects_v2(Bucket=filled, Prefix="c")
    assert r["Contents"][0]["ETag"] == f'"{hashlib.md5(b"c").hexdigest()}"'
