"""HTTPS, where current boto3 streams uploads as aws-chunked bodies with trailing checksums,
and the expiry of abandoned multipart uploads — each on a second gateway of the module's
cluster, started with its own settings (several gateways serve one volume side by side)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from cluster import free_port, scrape, wait_for
from s3gw import S3Env, S3Gateway, boto3_client, self_signed_cert


def test_https_streams_aws_chunked_with_trailing_checksums(s3env: S3Env, bucket: str, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    metrics = free_port()
    gw = S3Gateway(s3env.cluster, "s3-tls", tls=True,
                   env={"APPENDFS_S3_TLS_CERT_FILE": str(cert), "APPENDFS_S3_TLS_KEY_FILE": str(key),
                        "APPENDFS_S3_METRICS": f"127.0.0.1:{metrics}"}).start()
    try:
        s3 = boto3_client(gw.endpoint, s3env.key, verify=str(cert))
        data = os.urandom(3 << 20)
        for algo in ("CRC32", "SHA256", "CRC32C"):
            s3.put_object(Bucket=bucket, Key=f"tls/{algo}", Body=data, ChecksumAlgorithm=algo)
            assert s3env.s3.get_object(Bucket=bucket, Key=f"tls/{algo}")["Body"].read() == data
        uid = s3.create_multipart_upload(Bucket=bucket, Key="tls/multi")["UploadId"]
        p1 = s3.upload_part(Bucket=bucket, Key="tls/multi", UploadId=uid, PartNumber=1, Body=data + data)
        p2 = s3.upload_part(Bucket=bucket, Key="tls/multi", UploadId=uid, PartNumber=2, Body=b"end")
        s3.complete_multipart_upload(Bucket=bucket, Key="tls/multi", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": p1["ETag"]}, {"PartNumber": 2, "ETag": p2["ETag"]}]})
        assert s3.get_object(Bucket=bucket, Key="tls/multi")["Body"].read() == data + data + b"end"
        # the uploads above really came as aws-chunked bodies (what boto3 sends over HTTPS);
        # /metrics is the sum over the gateway's workers, which report every second
        def chunked_requests() -> float:
            return scrape(metrics).get("appendfs_s3_aws_chunked_requests", 0.0)
        wait_for(lambda: chunked_requests() >= 5, "5 aws-chunked requests counted in /metrics", timeout_s=30)
    finally:
        gw.stop()


def test_abandoned_uploads_expire(s3env: S3Env, bucket: str) -> None:
    gw = S3Gateway(s3env.cluster, "s3-expiry", env={"APPENDFS_S3_UPLOAD_EXPIRY_S": "3",
                                                     "APPENDFS_S3_EXPIRY_INTERVAL_S": "1"}).start()
    try:
        s3 = gw.client(s3env.key)
        uid = s3.create_multipart_upload(Bucket=bucket, Key="abandoned")["UploadId"]
        s3.upload_part(Bucket=bucket, Key="abandoned", UploadId=uid, PartNumber=1, Body=b"x" * 1000)

        def gone() -> bool:
            return uid not in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
        t0 = time.monotonic()
        wait_for(gone, "the abandoned upload to expire", 60, 0.5)
        assert time.monotonic() - t0 >= 1  # not before its age
        with pytest.raises(ClientError) as e:
            s3.list_parts(Bucket=bucket, Key="abandoned", UploadId=uid)
        assert e.value.response["Error"]["Code"] == "NoSuchUpload"
    finally:
        gw.stop()


def test_many_uploads_share_a_small_write_budget(s3env: S3Env, bucket: str) -> None:
    """10 concurrent 4 MiB PUTs through a gateway whose write budget is 8 MiB: partial
    buffers alone could exhaust it, so a writer that must wait sends its partial buffer
    first (no deadlock), and every object arrives whole."""
    import concurrent.futures

    gw = S3Gateway(s3env.cluster, "s3-budget", env={"APPENDFS_FS_WRITE_BUFFER_BYTES": str(8 << 20),
                                                     "APPENDFS_FS_CHUNK_BYTES": str(4 << 20)}).start()
    try:
        s3 = gw.client(s3env.key, max_pool_connections=16)
        bodies = {f"budget/{i}": os.urandom(4 << 20) for i in range(10)}
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            for f in [pool.submit(s3.put_object, Bucket=bucket, Key=k, Body=v) for k, v in bodies.items()]:
                f.result(timeout=300)
        for k, v in bodies.items():
            assert s3env.s3.get_object(Bucket=bucket, Key=k)["Body"].read() == v
    finally:
        gw.stop()
