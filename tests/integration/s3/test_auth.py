"""Authentication: presigned URLs work; wrong secrets, expired URLs, tampered headers and
keys of another tenant are refused with S3's error — and nothing is written."""

from __future__ import annotations

import time
import urllib.parse

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from s3gw import Key, S3Env, error_code, raw, send, signed


def test_presigned_get_and_put(s3env: S3Env, bucket: str) -> None:
    s3 = s3env.s3
    s3.put_object(Bucket=bucket, Key="pre/get", Body=b"hello presigned")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "pre/get"}, ExpiresIn=300)
    u = urllib.parse.urlsplit(url)
    st, _, body = raw(s3env.gw.endpoint, "GET", f"{u.path}?{u.query}")
    assert (st, body) == (200, b"hello presigned")
    url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "pre/put"}, ExpiresIn=300)
    u = urllib.parse.urlsplit(url)
    st, _, _ = raw(s3env.gw.endpoint, "PUT", f"{u.path}?{u.query}", body=b"uploaded via URL")
    assert st == 200
    assert s3.get_object(Bucket=bucket, Key="pre/put")["Body"].read() == b"uploaded via URL"


def test_expired_presigned_url(s3env: S3Env, bucket: str) -> None:
    s3env.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    req = AWSRequest(method="GET", url=f"{s3env.gw.endpoint}/{bucket}/k")
    creds = Credentials(s3env.key.access_key, s3env.key.secret_key)
    S3SigV4QueryAuth(creds, "s3", "us-east-1", expires=1).add_auth(req)
    time.sleep(2.5)
    u = urllib.parse.urlsplit(req.url)
    st, _, body = raw(s3env.gw.endpoint, "GET", f"{u.path}?{u.query}")
    assert st == 403 and error_code(body) == "AccessDenied"


def test_wrong_secret_writes_nothing(s3env: S3Env, bucket: str) -> None:
    bad = s3env.gw.client(Key(s3env.key.access_key, "x" * 40, s3env.key.tenant))
    with pytest.raises(ClientError) as e:
        bad.put_object(Bucket=bucket, Key="forged", Body=b"x")
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    unknown = s3env.gw.client(Key("AKIDONTEXIST00000000", "x" * 40, "none"))
    with pytest.raises(ClientError) as e:
        unknown.put_object(Bucket=bucket, Key="forged", Body=b"x")
    assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert s3env.s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_tampered_signed_header(s3env: S3Env, bucket: str) -> None:
    req = signed(s3env.gw.endpoint, s3env.key, "PUT", f"/{bucket}/t", b"data",
                 {"x-amz-meta-owner": "alice", "content-type": "text/plain"})
    req.headers.replace_header("x-amz-meta-owner", "mallory")
    st, _, body = send(s3env.gw.endpoint, req)
    assert st == 403 and error_code(body) == "SignatureDoesNotMatch"
    req = signed(s3env.gw.endpoint, s3env.key, "PUT", f"/{bucket}/t", b"data")
    st, _, body = send(s3env.gw.endpoint, _retarget(req, f"/{bucket}/other"))
    assert st == 403 and error_code(body) == "SignatureDoesNotMatch"
    req = signed(s3env.gw.endpoint, s3env.key, "PUT", f"/{bucket}/t", b"data")
    req.data = b"DATA"  # the body no longer matches its signed SHA-256
    st, _, body = send(s3env.gw.endpoint, req)
    assert st == 400 and error_code(body) == "XAmzContentSHA256Mismatch"
    assert s3env.s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def _retarget(req: AWSRequest, path: str) -> AWSRequest:
    u = urllib.parse.urlsplit(req.url)
    req.url = urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, ""))
    return req


def test_clock_skew(s3env: S3Env, bucket: str) -> None:
    import datetime as dt
    from unittest import mock

    req = AWSRequest(method="GET", url=f"{s3env.gw.endpoint}/{bucket}")
    auth = S3SigV4Auth(Credentials(s3env.key.access_key, s3env.key.secret_key), "s3", "us-east-1")
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with mock.patch("botocore.auth.get_current_datetime", return_value=an_hour_ago):
        auth.add_auth(req)
    st, _, body = send(s3env.gw.endpoint, req)
    assert st == 403 and error_code(body) == "RequestTimeTooSkewed"


def test_anonymous_is_refused(s3env: S3Env, bucket: str) -> None:
    st, _, body = raw(s3env.gw.endpoint, "GET", f"/{bucket}")
    assert st == 403 and error_code(body) == "AccessDenied"
    st, _, body = raw(s3env.gw.endpoint, "PUT", f"/{bucket}/anon", body=b"x")
    assert st == 403
    assert s3env.s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_deleted_key_stops_working(s3env: S3Env, bucket: str) -> None:
    k = s3env.gw.new_key(s3env.key.tenant)
    c = s3env.gw.client(k)
    assert bucket in [b["Name"] for b in c.list_buckets()["Buckets"]]  # same tenant, same buckets
    s3env.cluster.run(["s3", "keys", "delete", "--meta", s3env.cluster.meta_url, k.access_key])
    deadline = time.monotonic() + 30
    while True:
        try:
            c.list_buckets()
        except ClientError as e:
            assert e.response["Error"]["Code"] == "InvalidAccessKeyId"
            break
        assert time.monotonic() < deadline, "a deleted key kept working"
        time.sleep(1)
