"""Bad input gets S3's error and writes nothing; the gateway keeps serving good clients
during and after a burst of bad requests."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
import urllib.parse

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from s3gw import Key, S3Env, error_code, raw, send, signed

STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


class _StreamingAuth(S3SigV4Auth):
    """botocore's own SigV4 header signing, for a body sent as signed aws-chunked."""

    def payload(self, request: AWSRequest) -> str:
        return STREAMING


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_chunked(endpoint: str, key: Key, path: str, data: bytes, chunk: int = 64 << 10,
                   corrupt_chunk: int | None = None) -> AWSRequest:
    """A PUT whose body is aws-chunked with chunk signatures chained from the seed (the
    request's own signature), per AWS's "Signature Calculations for the Authorization
    Header: Transferring Payload in Multiple Chunks"."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]
    framing = sum(len(f"{len(p):x};chunk-signature=".encode()) + 64 + 4 + len(p) for p in pieces)
    req = AWSRequest(method="PUT", url=endpoint + path, data=b"", headers={
        "content-encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(data)),
        "content-length": str(framing)})
    auth = _StreamingAuth(Credentials(key.access_key, key.secret_key), "s3", "us-east-1")
    auth.add_auth(req)
    stamp = req.context["timestamp"]
    scope = f"{stamp[:8]}/us-east-1/s3/aws4_request"
    k = _hmac(_hmac(_hmac(_hmac(f"AWS4{key.secret_key}".encode(), stamp[:8]), "us-east-1"), "s3"),
              "aws4_request")
    prev = req.headers["Authorization"].rsplit("Signature=", 1)[1]
    body = bytearray()
    for i, p in enumerate(pieces):
        sts = f"AWS4-HMAC-SHA256-PAYLOAD\n{stamp}\n{scope}\n{prev}\n{EMPTY_SHA}\n{hashlib.sha256(p).hexdigest()}"
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        prev = sig
        if i == corrupt_chunk:
            sig = ("0" if sig[0] != "0" else "1") + sig[1:]
        body += f"{len(p):x};chunk-signature={sig}\r\n".encode() + p + b"\r\n"
    assert len(body) == framing
    req.data = bytes(body)
    return req


def keys(s3env: S3Env, bucket: str) -> list[str]:
    return [o["Key"] for o in s3env.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_signed_chunks_and_a_broken_chunk_signature(s3env: S3Env, bucket: str) -> None:
    data = os.urandom(300_000)
    st, _, body = send(s3env.gw.endpoint, signed_chunked(s3env.gw.endpoint, s3env.key, f"/{bucket}/good", data))
    assert st == 200, body
    assert s3env.s3.get_object(Bucket=bucket, Key="good")["Body"].read() == data
    bad = signed_chunked(s3env.gw.endpoint, s3env.key, f"/{bucket}/bad", data, corrupt_chunk=2)
    st, _, body = send(s3env.gw.endpoint, bad)
    assert st == 403 and error_code(body) == "SignatureDoesNotMatch"
    assert keys(s3env, bucket) == ["good"]


def test_malformed_xml(s3env: S3Env, bucket: str) -> None:
    uid = s3env.s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    for doc in (b"<CompleteMultipartUpload><Part>", b"not xml at all", b"<Other/>",
                b'<!DOCTYPE x [<!ENTITY a "aaaa">]><CompleteMultipartUpload/>'):
        st, _, body = send(s3env.gw.endpoint, signed(s3env.gw.endpoint, s3env.key, "POST",
                                                     f"/{bucket}/k?uploadId={uid}", doc))
        assert st == 400 and error_code(body) == "MalformedXML", doc
    md5 = __import__("base64").b64encode(hashlib.md5(b"<Delete><Object>").digest()).decode()
    st, _, body = send(s3env.gw.endpoint, signed(s3env.gw.endpoint, s3env.key, "POST", f"/{bucket}?delete",
                                                 b"<Delete><Object>", {"content-md5": md5}))
    assert st == 400 and error_code(body) == "MalformedXML"
    assert keys(s3env, bucket) == []


def test_body_shorter_than_content_length(s3env: S3Env, bucket: str) -> None:
    req = AWSRequest(method="PUT", url=f"{s3env.gw.endpoint}/{bucket}/short",
                     headers={"content-length": "100000", "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})

    class Unsigned(S3SigV4Auth):
        def payload(self, request: AWSRequest) -> str:
            return "UNSIGNED-PAYLOAD"

    Unsigned(Credentials(s3env.key.access_key, s3env.key.secret_key), "s3", "us-east-1").add_auth(req)
    u = urllib.parse.urlsplit(s3env.gw.endpoint)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        head = f"PUT /{bucket}/short HTTP/1.1\r\nhost: {u.netloc}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "host")
        s.sendall(head.encode() + b"\r\n" + b"x" * 1000)
        s.shutdown(socket.SHUT_WR)  # the client gives up 1,000 bytes into 100,000
        s.settimeout(30)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    time.sleep(0.5)
    assert keys(s3env, bucket) == []
    # and the gateway still answers
    s3env.s3.put_object(Bucket=bucket, Key="after", Body=b"ok")
    assert keys(s3env, bucket) == ["after"]


def _bad_requests(endpoint: str, bucket: str, n: int, errors: list[str]) -> None:
    u = urllib.parse.urlsplit(endpoint)
    garbage = [
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",  # anonymous
        f"PUT /{bucket}/x HTTP/1.1\r\nhost: x\r\nauthorization: AWS4-HMAC-SHA256 nonsense\r\n"
        "content-length: 3\r\n\r\nabc".encode(),
        f"GET /{bucket}?list-type=2 HTTP/1.1\r\nhost: x\r\nauthorization: AWS4-HMAC-SHA256 Credential=AKIAFAKE/"
        "20200101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\r\n".encode(),
        b"\x16\x03\x01garbage that is not http at all\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    ]
    for i in range(n):
        try:
            with socket.create_connection((u.hostname, u.port), timeout=30) as s:
                s.sendall(garbage[i % len(garbage)])
                s.settimeout(30)
                s.recv(4096)
        except OSError as exc:
            errors.append(f"bad request {i}: {exc}")


def test_burst_of_bad_requests_does_not_stop_good_clients(s3env: S3Env, bucket: str) -> None:
    errors: list[str] = []
    threads = [threading.Thread(target=_bad_requests, args=(s3env.gw.endpoint, bucket, 500, errors))
               for _ in range(6)]
    for t in threads:
        t.start()
    good = 0
    while any(t.is_alive() for t in threads):
        data = os.urandom(10_000)
        s3env.s3.put_object(Bucket=bucket, Key=f"good/{good}", Body=data)
        assert s3env.s3.get_object(Bucket=bucket, Key=f"good/{good}")["Body"].read() == data
        good += 1
    for t in threads:
        t.join()
    assert good > 0
    assert len(errors) < 30, errors[:5]  # connection-level refusals of garbage are fine, not a dead server
    assert sorted(keys(s3env, bucket), key=lambda k: int(k.split("/")[1])) == [f"good/{i}" for i in range(good)]
    st, _, body = raw(s3env.gw.endpoint, "GET", "/")
    assert st == 403 and error_code(body) == "AccessDenied"
    assert s3env.gw.proc.alive
