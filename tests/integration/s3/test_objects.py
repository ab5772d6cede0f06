"""Object operations through boto3 against a real gateway on a real cluster (both engines)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import zlib

import pytest
from botocore.exceptions import ClientError
from s3gw import S3Env


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def status(exc: pytest.ExceptionInfo[ClientError]) -> int:
    return int(exc.value.response["ResponseMetadata"]["HTTPStatusCode"])


def test_put_get_head_delete(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    data = os.urandom(3 << 20) + b"tail"
    put = s3.put_object(Bucket=bucket, Key="dir/sub/obj.bin", Body=data, ContentType="application/x-test",
                        Metadata={"color": "blue", "n": "1"}, CacheControl="no-cache",
                        ContentDisposition="attachment")
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket=bucket, Key="dir/sub/obj.bin")
    assert got["Body"].read() == data
    assert got["ETag"] == put["ETag"]
    assert got["ContentType"] == "application/x-test"
    assert got["Metadata"] == {"color": "blue", "n": "1"}
    assert got["CacheControl"] == "no-cache" and got["ContentDisposition"] == "attachment"
    head = s3.head_object(Bucket=bucket, Key="dir/sub/obj.bin")
    assert head["ContentLength"] == len(data) and head["ETag"] == put["ETag"]
    s3.delete_object(Bucket=bucket, Key="dir/sub/obj.bin")
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="dir/sub/obj.bin")
    assert status(e) == 404
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir/sub/obj.bin")
    assert code(e) == "NoSuchKey"
    s3.delete_object(Bucket=bucket, Key="never-there")  # S3 answers 204 for a missing key too


def test_empty_object_and_overwrite(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    s3.put_object(Bucket=bucket, Key="e", Body=b"")
    got = s3.get_object(Bucket=bucket, Key="e")
    assert got["Body"].read() == b"" and got["ETag"] == f'"{hashlib.md5(b"").hexdigest()}"'
    for i in range(3):
        s3.put_object(Bucket=bucket, Key="e", Body=f"v{i}".encode())
    assert s3.get_object(Bucket=bucket, Key="e")["Body"].read() == b"v2"


def test_ranges(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    data = os.urandom(5 << 20)
    s3.put_object(Bucket=bucket, Key="r", Body=data)
    for rng, want in [("bytes=0-0", data[:1]), ("bytes=100-199", data[100:200]), ("bytes=-10", data[-10:]),
                      (f"bytes={len(data) - 5}-", data[-5:]), ("bytes=1048570-3145735", data[1048570:3145736]),
                      ("bytes=10-99999999", data[10:])]:
        got = s3.get_object(Bucket=bucket, Key="r", Range=rng)
        assert got["Body"].read() == want, rng
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert got["ContentRange"].endswith(f"/{len(data)}")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="r", Range=f"bytes={len(data)}-")
    assert code(e) == "InvalidRange" and status(e) == 416


def test_read_conditions(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    etag = s3.put_object(Bucket=bucket, Key="c", Body=b"x")["ETag"]
    assert s3.get_object(Bucket=bucket, Key="c", IfMatch=etag)["Body"].read() == b"x"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfMatch='"0123"')
    assert status(e) == 412
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfNoneMatch=etag)
    assert status(e) == 304
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert s3.get_object(Bucket=bucket, Key="c", IfModifiedSince=past)["Body"].read() == b"x"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfModifiedSince=future)
    assert status(e) == 304
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfUnmodifiedSince=past)
    assert status(e) == 412


def test_conditional_puts(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    s3.put_object(Bucket=bucket, Key="only-once", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="only-once", Body=b"2", IfNoneMatch="*")
    assert status(e) == 412
    assert s3.get_object(Bucket=bucket, Key="only-once")["Body"].read() == b"1"
    etag = s3.head_object(Bucket=bucket, Key="only-once")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="only-once", Body=b"3", IfMatch='"ffffffffffffffffffffffffffffffff"')
    assert status(e) == 412
    s3.put_object(Bucket=bucket, Key="only-once", Body=b"4", IfMatch=etag)
    assert s3.get_object(Bucket=bucket, Key="only-once")["Body"].read() == b"4"


def test_digests_are_checked_and_nothing_is_written(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    data = b"payload" * 1000
    good_md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    s3.put_object(Bucket=bucket, Key="md5", Body=data, ContentMD5=good_md5)
    bad_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="md5-bad", Body=data, ContentMD5=bad_md5)
    assert code(e) == "BadDigest"
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    s3.put_object(Bucket=bucket, Key="crc", Body=data, ChecksumCRC32=crc)
    wrong = base64.b64encode((zlib.crc32(data) ^ 1).to_bytes(4, "big")).decode()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="crc-bad", Body=data, ChecksumCRC32=wrong)
    assert code(e) == "BadDigest"
    for algo in ("SHA256", "SHA1", "CRC32", "CRC32C"):
        try:
            s3.put_object(Bucket=bucket, Key=f"algo-{algo}", Body=data, ChecksumAlgorithm=algo)
        except Exception as exc:  # botocore needs awscrt for some algorithms
            if "awscrt" in str(exc).lower() or "crt" in type(exc).__name__.lower():
                continue
            raise
        assert s3.get_object(Bucket=bucket, Key=f"algo-{algo}")["Body"].read() == data
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "md5-bad" not in keys and "crc-bad" not in keys


def test_copy_object(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    data = os.urandom(1 << 20)
    etag = s3.put_object(Bucket=bucket, Key="src", Body=data, Metadata={"a": "1"}, ContentType="text/x")["ETag"]
    r = s3.copy_object(Bucket=bucket, Key="dst/copy", CopySource={"Bucket": bucket, "Key": "src"})
    assert r["CopyObjectResult"]["ETag"] == etag
    got = s3.get_object(Bucket=bucket, Key="dst/copy")
    assert got["Body"].read() == data and got["Metadata"] == {"a": "1"} and got["ContentType"] == "text/x"
    s3.copy_object(Bucket=bucket, Key="dst/replaced", CopySource=f"{bucket}/src", MetadataDirective="REPLACE",
                   Metadata={"b": "2"})
    assert s3.head_object(Bucket=bucket, Key="dst/replaced")["Metadata"] == {"b": "2"}
    s3.put_object(Bucket=bucket, Key="src", Body=b"changed")  # the copy does not change with its source
    assert s3.get_object(Bucket=bucket, Key="dst/copy")["Body"].read() == data
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=bucket, Key="x", CopySource={"Bucket": bucket, "Key": "missing"})
    assert code(e) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=bucket, Key="x", CopySource={"Bucket": bucket, "Key": "src"},
                       CopySourceIfMatch='"0000"')
    assert status(e) == 412


def test_delete_objects(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    for k in ("a", "b/c", "b/d"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a"}, {"Key": "b/c"}, {"Key": "nope"},
                                                             {"Key": "bad/../key"}]})
    assert {d["Key"] for d in r["Deleted"]} == {"a", "b/c", "nope"}
    assert [(x["Key"], x["Code"]) for x in r["Errors"]] == [("bad/../key", "InvalidArgument")]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["b/d"]
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "b/d"}], "Quiet": True})
    assert "Deleted" not in r
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_directory_keys_and_conflicts(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    s3.put_object(Bucket=bucket, Key="folder/", Body=b"")
    assert s3.head_object(Bucket=bucket, Key="folder/")["ContentLength"] == 0
    s3.put_object(Bucket=bucket, Key="file", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="file/child", Body=b"y")  # a file cannot become a directory
    assert status(e) == 409
    s3.put_object(Bucket=bucket, Key="dir/child", Body=b"y")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="dir", Body=b"z")  # nor a directory a file
    assert status(e) == 409
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir")
    assert code(e) == "NoSuchKey"
    assert s3.get_object(Bucket=bucket, Key="dir/child")["Body"].read() == b"y"


@pytest.mark.parametrize(("key", "want"), [("a/../b", "InvalidArgument"), ("x" * 256, "KeyTooLongError"),
                                           ("a//b", "InvalidArgument")])
def test_bad_keys_are_refused(s3env: S3Env, bucket: str, key: str, want: str) -> None:
    with pytest.raises(ClientError) as e:
        s3env.s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert code(e) == want


def test_unsupported_subresource_is_501(s3env: S3Env, bucket: str) -> None:
    s3env.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3env.s3.get_object_tagging(Bucket=bucket, Key="k")
    assert status(e) == 501
