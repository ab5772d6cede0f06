"""Multipart uploads through boto3 and the aws cli against a real gateway."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3gw import S3Env

MiB = 1 << 20


def multipart_etag(parts: list[bytes]) -> str:
    return f'"{hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()}-{len(parts)}"'


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_upload_list_complete(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), b"last part"]
    up = s3.create_multipart_upload(Bucket=bucket, Key="big/object", ContentType="text/x",
                                    Metadata={"kind": "multi"})
    uid = up["UploadId"]
    assert uid in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    etags = {}
    for n in (3, 1, 2):  # any order
        etags[n] = s3.upload_part(Bucket=bucket, Key="big/object", UploadId=uid, PartNumber=n,
                                  Body=parts[n - 1])["ETag"]
    # a part uploaded again replaces the first one
    etags[2] = s3.upload_part(Bucket=bucket, Key="big/object", UploadId=uid, PartNumber=2, Body=parts[1])["ETag"]
    listed = s3.list_parts(Bucket=bucket, Key="big/object", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in listed] == \
        [(n, etags[n], len(parts[n - 1])) for n in (1, 2, 3)]
    page = s3.list_parts(Bucket=bucket, Key="big/object", UploadId=uid, MaxParts=2)
    assert page["IsTruncated"] and [p["PartNumber"] for p in page["Parts"]] == [1, 2]
    assert "big/object" not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    done = s3.complete_multipart_upload(Bucket=bucket, Key="big/object", UploadId=uid, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})
    assert done["ETag"] == multipart_etag(parts)
    got = s3.get_object(Bucket=bucket, Key="big/object")
    assert got["Body"].read() == b"".join(parts)
    assert got["ETag"] == multipart_etag(parts) and got["Metadata"] == {"kind": "multi"}
    assert got["ContentType"] == "text/x"
    r = s3.get_object(Bucket=bucket, Key="big/object", Range=f"bytes={5 * MiB - 3}-{5 * MiB + 2}")
    assert r["Body"].read() == parts[0][-3:] + parts[1][:3]
    with pytest.raises(ClientError) as e:
        s3.list_parts(Bucket=bucket, Key="big/object", UploadId=uid)
    assert code(e) == "NoSuchUpload"


def test_complete_checks(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    uid = s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key="k", UploadId=uid, PartNumber=1, Body=b"small")["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key="k", UploadId=uid, PartNumber=2, Body=b"tail")["ETag"]
    cases = [([(2, e2), (1, e1)], "InvalidPartOrder"), ([(1, e1), (3, e2)], "InvalidPart"),
             ([(1, '"0000"'), (2, e2)], "InvalidPart"), ([(1, e1), (2, e2)], "EntityTooSmall")]
    for parts, want in cases:
        with pytest.raises(ClientError) as e:
            s3.complete_multipart_upload(Bucket=bucket, Key="k", UploadId=uid, MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": t} for n, t in parts]})
        assert code(e) == want, parts
    # one small part is fine (it is the last)
    done = s3.complete_multipart_upload(Bucket=bucket, Key="k", UploadId=uid,
                                        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}]})
    assert done["ETag"] == multipart_etag([b"small"])
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"small"


def test_abort_and_bad_ids(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    uid = s3.create_multipart_upload(Bucket=bucket, Key="gone")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="gone", UploadId=uid, PartNumber=1, Body=b"x")
    s3.abort_multipart_upload(Bucket=bucket, Key="gone", UploadId=uid)
    assert uid not in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="gone", UploadId=uid, PartNumber=2, Body=b"x")
    assert code(e) == "NoSuchUpload"
    with pytest.raises(ClientError) as e:
        s3.abort_multipart_upload(Bucket=bucket, Key="gone", UploadId="nope")
    assert code(e) == "NoSuchUpload"
    uid = s3.create_multipart_upload(Bucket=bucket, Key="k2")["UploadId"]
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="k2", UploadId=uid, PartNumber=10001, Body=b"x")
    assert code(e) == "InvalidArgument"
    with pytest.raises(ClientError) as e:  # the upload id of another key
        s3.upload_part(Bucket=bucket, Key="other", UploadId=uid, PartNumber=1, Body=b"x")
    assert code(e) == "NoSuchUpload"


def test_upload_part_copy(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    src = os.urandom(7 * MiB)
    s3.put_object(Bucket=bucket, Key="src", Body=src)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
    p1 = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=uid, PartNumber=1,
                             CopySource={"Bucket": bucket, "Key": "src"}, CopySourceRange=f"bytes=0-{5 * MiB - 1}")
    assert p1["CopyPartResult"]["ETag"] == f'"{hashlib.md5(src[:5 * MiB]).hexdigest()}"'
    p2 = s3.upload_part(Bucket=bucket, Key="assembled", UploadId=uid, PartNumber=2, Body=b"middle")
    s3.complete_multipart_upload(Bucket=bucket, Key="assembled", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": p1["CopyPartResult"]["ETag"]}, {"PartNumber": 2, "ETag": p2["ETag"]}]})
    assert s3.get_object(Bucket=bucket, Key="assembled")["Body"].read() == src[:5 * MiB] + b"middle"


def test_uploads_listing(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    ids = {k: s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in ("x/1", "x/2", "y")}
    r = s3.list_multipart_uploads(Bucket=bucket, Prefix="x/")
    assert sorted(u["Key"] for u in r["Uploads"]) == ["x/1", "x/2"]
    r = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=2)
    assert r["IsTruncated"] and len(r["Uploads"]) == 2
    r2 = s3.list_multipart_uploads(Bucket=bucket, KeyMarker=r["NextKeyMarker"],
                                   UploadIdMarker=r["NextUploadIdMarker"])
    assert [u["Key"] for u in r["Uploads"] + r2["Uploads"]] == ["x/1", "x/2", "y"]
    for k, u in ids.items():
        s3.abort_multipart_upload(Bucket=bucket, Key=k, UploadId=u)


def test_aws_cli_100_mib_multipart(s3env: S3Env, bucket: str, tmp_path: Path) -> None:
    """`aws s3 cp` with its defaults (8 MiB parts, 10 in parallel) up, then down, then a
    ranged GET with `aws s3api`."""
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MiB))
    s3env.gw.aws(s3env.key, "s3", "cp", str(src), f"s3://{bucket}/cli/big.bin")
    head = s3env.s3.head_object(Bucket=bucket, Key="cli/big.bin")
    assert head["ContentLength"] == 100 * MiB
    assert head["ETag"].endswith('-13"')  # 100 MiB in 8 MiB parts
    back = tmp_path / "back.bin"
    s3env.gw.aws(s3env.key, "s3", "cp", f"s3://{bucket}/cli/big.bin", str(back))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    part = tmp_path / "part.bin"
    s3env.gw.aws(s3env.key, "s3api", "get-object", "--bucket", bucket, "--key", "cli/big.bin",
                 "--range", "bytes=50000000-50000099", str(part))
    with open(src, "rb") as f:
        f.seek(50_000_000)
        assert part.read_bytes() == f.read(100)
